#!/bin/sh
# Build the interop test programs. Runs INSIDE the chroot (tests/realdtrace/chroot.sh), in a
# directory holding a copy of tests/realdtrace/progs/; partner.build_programs() runs it with
# the chroot's mounts in place (dtrace -h/-G read BTF from /sys).
#   usdtprog       executable (PIE), provider rdtmain; dlopens libusdtlib.so on command
#   libusdtlib.so  shared library, provider rdtlib
set -eu
SYSLIB=${SYSLIB:-/opt/dtprobed-py/dtrace-syslib}
DTRACE="dtrace -xsyslibdir=$SYSLIB"
# sys/usdt.h lives here (Cflags of the chroot's dtrace_sdt.pc)
CFLAGS="-O2 -g -Wall -Wextra -Werror -I/usr/lib/x86_64-linux-gnu/dtrace/include"

$DTRACE -h -s rdtmain.d -o rdtmain.h
$DTRACE -h -s rdtlib.d -o rdtlib.h

gcc $CFLAGS -c usdtprog.c -o usdtprog.o
$DTRACE -G -s rdtmain.d usdtprog.o -o rdtmain.o
gcc -o usdtprog usdtprog.o rdtmain.o -ldl

gcc $CFLAGS -fPIC -c usdtlib.c -o usdtlib.o
$DTRACE -G -s rdtlib.d usdtlib.o -o rdtlib.o
gcc -shared -o libusdtlib.so usdtlib.o rdtlib.o
