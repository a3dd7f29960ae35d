#!/bin/sh
# Build the parser fixtures. Runs INSIDE the chroot, in a copy of
# tests/realdtrace/fixtures_src/ (make_fixtures.sh does that). Each object is built small
# (-Os, stripped, no build id, no separate code segment).
set -eu
SYSLIB=${SYSLIB:-/opt/dtprobed-py/dtrace-syslib}
DTRACE="dtrace -xsyslibdir=$SYSLIB"
CFLAGS="-Os -Wall -Wextra -Werror -I/usr/lib/x86_64-linux-gnu/dtrace/include"
LDFLAGS="-s -Wl,--build-id=none -Wl,-z,noseparate-code"

for p in fxexec fxlib fxen fxkinds; do $DTRACE -h -s $p.d -o $p.h; done

# fx_exec: PIE (ET_DYN) executable
gcc $CFLAGS -c fx_exec.c -o fx_exec.o
$DTRACE -G -s fxexec.d fx_exec.o -o fxexec.o
gcc $LDFLAGS -o fx_exec fx_exec.o fxexec.o

# libfx.so: shared library (ET_DYN)
gcc $CFLAGS -fPIC -c libfx.c -o libfx.o
$DTRACE -G -s fxlib.d libfx.o -o fxlib.o
gcc $LDFLAGS -shared -o libfx.so libfx.o fxlib.o

# fx_isenabled: non-PIE (ET_EXEC) executable with is-enabled probes
gcc $CFLAGS -fno-pie -c fx_isenabled.c -o fx_isenabled.o
$DTRACE -G -s fxen.d fx_isenabled.o -o fxen.o
gcc $LDFLAGS -no-pie -o fx_isenabled fx_isenabled.o fxen.o

# fx_kinds: PIE executable, two providers, many probe kinds
gcc $CFLAGS -c fx_kinds.c -o fx_kinds.o
$DTRACE -G -s fxkinds.d fx_kinds.o -o fxkinds.o
gcc $LDFLAGS -o fx_kinds fx_kinds.o fxkinds.o
