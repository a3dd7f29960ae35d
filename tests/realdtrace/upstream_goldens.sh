#!/bin/bash
# Goldens from upstream's real C dtprobed 2.0.7 (Debian's libdtrace2, in the sid chroot of
# chroot.sh), run on a kernel with CUSE (tools/cuse-vm): for each scenario a fresh tmpfs on
# the chroot's /run, a fresh `dtprobed -F` (default state directory /run/dtrace, default
# device /dev/dtrace/helper), programs that register through that helper, and a copy of the
# whole state tree after each step: every file's bytes, a manifest (path, type, mode, nlink,
# inode, size, sha256, symlink target, xattrs) and `find -printf`. Results go to
# tests/golden/upstream-2.0.7/ (README.md there says what they show).
#
#   tests/realdtrace/upstream_goldens.sh [--runs N]     (default 2 runs: stable vs garbage)
#
# Programs (built in the chroot by this script, into $ROOT/var/cache/dtprobed-py/goldens):
#   - the fixtures of tests/parser/fixtures/notes/ (bytes as committed), run with
#     LD_PRELOAD=fxhold.so: it wraps __libc_start_main so that after main() returns the
#     process stays alive and obeys commands on stdin (q: return from main, so exit() and
#     drti's destructor REMOVE; k: fork, the child registers again (drti's atfork handler)
#     and waits for SIGTERM, then exit(0); w: reap the child; o PATH: dlopen; c: dlclose;
#     x PATH: execv, no REMOVE); every program has DTRACE_DOF_INIT_DEBUG=1 (drti's messages
#     are recorded and checked);
#   - fxload: an empty main() under the same wrapper, to dlopen/dlclose libfx.so;
#   - tests/realkernel/client.c (ADDDOF, DOF from a file mapping) with a DOF made by the
#     project's builder (tests.realkernel.harness.probes_dof), kept as objects/probes.dof.
# GOLDEN_ONLY=name,name runs only those scenarios (scenario list: SCENARIOS in driver.py).
# Measured: ~65 s for the default 2 runs (2-core host, TCG). Exit 0, or 1 if a scenario
# failed (its folder then holds FAILED), or cuse-vm.sh's status (124 timeout, 125 VM).
# Host needs: root, the chroot (chroot.sh builds it), qemu (cuse-vm.sh installs it), the venv.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
WORK_IN=/var/cache/dtprobed-py/goldens   # inside the chroot

log() { printf '[upstream_goldens %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ----------------------------------------------------------------------------- guest side
if [ "${1:-}" = --guest ]; then
    ROOT=$2 OUTRUN=$3
    # Always mount, never test with mountpoint(1): the host's own mounts in the chroot
    # (partner.py binds the host's /proc, /sys, /dev there while its tests run) show through
    # the 9p root, without /dev/cuse. sysfs then refuses a second mount ("already mounted");
    # nothing here needs /sys, so that one may fail.
    mount -t proc proc "$ROOT/proc"
    mount -t sysfs sysfs "$ROOT/sys" 2>/dev/null || true
    mount --rbind /dev "$ROOT/dev"
    [ -e "$ROOT/proc/$$/maps" ] || { echo "no guest /proc in $ROOT/proc" >&2; exit 1; }
    [ -c "$ROOT/dev/cuse" ] || { echo "no $ROOT/dev/cuse in the guest" >&2; exit 1; }
    exec /usr/bin/python3 -I "$ROOT$WORK_IN/driver.py" "$ROOT" "$WORK_IN" "$OUTRUN"
fi

# ----------------------------------------------------------------------------- host side
RUNS=2
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=${2:?}; shift ;;
        -h | --help) sed -n '2,26p' "$SELF"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || die "must run as root"
T0=$(date +%s)
OUT=$REPO/tests/golden/upstream-2.0.7
FIX=$REPO/tests/parser/fixtures/notes
ROOT=$("$HERE/chroot.sh")
W=$ROOT$WORK_IN
# The work folder is kept between runs and files are only overwritten in place when their
# bytes change (cp onto an existing file keeps its inode): the objects keep their inode
# numbers, so the `$dev-$ino` names in the goldens stay the same from one run to the next.
put() {  # source destination
    cmp -s "$1" "$2" || cp "$1" "$2"
}
mkdir -p "$W/.build"
for f in fx_exec libfx.so fx_isenabled fx_kinds; do put "$FIX/$f" "$W/$f"; done
put "$REPO/tests/realkernel/client.c" "$W/client.c"

cat >"$W/fxhold.c" <<'EOF'
/* LD_PRELOAD: keep a program alive after main() returns, obeying commands on stdin. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef int (*main_t)(int, char **, char **);
static main_t real_main;
static pid_t child;
static volatile sig_atomic_t stop;
static void *lib;

static void on_term(int sig) { (void)sig; stop = 1; }

static void say(const char *fmt, const char *a, long n)
{
	printf("%d ", (int)getpid());
	printf(fmt, a, n);
	putchar('\n');
	fflush(stdout);
}

static int hold(int argc, char **argv, char **envp)
{
	char line[4096];
	int ret = real_main(argc, argv, envp);

	say("held %s %ld", "main", (long)ret);
	while (fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\n")] = '\0';
		if (strcmp(line, "q") == 0) {
			say("ok %s %ld", "q", 0);
			return ret;
		} else if (strcmp(line, "k") == 0) {
			int fds[2];
			char c = 0;

			if (pipe(fds) < 0) { say("error %s %ld", "pipe", 0); continue; }
			child = fork();
			if (child == 0) {
				/* drti's atfork child handler has registered by now */
				struct sigaction sa;
				memset(&sa, 0, sizeof(sa));
				sa.sa_handler = on_term;
				sigaction(SIGTERM, &sa, NULL);
				close(fds[0]);
				if (write(fds[1], &c, 1) != 1) _exit(3);
				close(fds[1]);
				while (!stop)
					pause();
				exit(0);  /* destructors: drti sends REMOVE */
			}
			close(fds[1]);
			if (read(fds[0], &c, 1) != 1) say("error %s %ld", "child", 0);
			close(fds[0]);
			say("ok %s %ld", "k", (long)child);
		} else if (strcmp(line, "w") == 0) {
			int st = -1;
			waitpid(child, &st, 0);
			say("ok %s %ld", "w", (long)st);
		} else if (strncmp(line, "o ", 2) == 0) {
			lib = dlopen(line + 2, RTLD_NOW);
			say(lib ? "ok %s %ld" : "error %s %ld", lib ? "o" : dlerror(), 0);
		} else if (strncmp(line, "x ", 2) == 0) {
			char *args[] = { line + 2, NULL };
			/* no destructors, no REMOVE: the new image registers from its constructor */
			execv(line + 2, args);
			say("error %s %ld", "exec", 0);
		} else if (strcmp(line, "c") == 0) {
			int r = lib ? dlclose(lib) : -1;
			lib = NULL;
			say("ok %s %ld", "c", (long)r);
		} else {
			say("error %s %ld", line, 0);
		}
	}
	return ret;
}

int __libc_start_main(main_t main, int argc, char **argv, void (*init)(void),
		      void (*fini)(void), void (*rtld_fini)(void), void *stack_end)
{
	int (*real)(main_t, int, char **, void (*)(void), void (*)(void), void (*)(void),
		    void *) = dlsym(RTLD_NEXT, "__libc_start_main");
	real_main = main;
	return real(hold, argc, argv, init, fini, rtld_fini, stack_end);
}
EOF
printf 'int main(void)\n{\n\treturn 0;\n}\n' >"$W/fxload.c"

log "DOF for the ADDDOF client (tests.realkernel.harness.probes_dof)"
(cd "$REPO" && .venv/bin/python -c '
import sys
from tests.realkernel.harness import probes_dof
open(sys.argv[1], "wb").write(probes_dof("goldprov", 3))
' "$W/.build/probes.dof")
put "$W/.build/probes.dof" "$W/probes.dof"

log "building fxhold.so, fxload, dtprobed-test-client in the chroot"
unshare --mount --propagation private bash -c '
    set -e
    mount --bind /proc "$1/proc"
    chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C sh -c "
        set -e; cd $2
        gcc -O2 -Wall -Werror -shared -fPIC -o .build/fxhold.so fxhold.c -ldl
        gcc -O2 -Wall -Werror -o .build/fxload fxload.c
        gcc -O1 -Wall -no-pie -o .build/dtprobed-test-client client.c
        for f in fxhold.so fxload dtprobed-test-client; do
            cmp -s .build/\$f \$f || cp .build/\$f \$f
        done
        for f in fx_exec libfx.so fx_isenabled fx_kinds fxload dtprobed-test-client; do
            readelf -hSW \$f >\$f.readelf.txt
        done
        dpkg-query -W libdtrace2 dtrace gcc libc6 >versions.txt"
' sh "$ROOT" "$WORK_IN"

# The in-guest driver (Python, standard library; runs on the guest's /usr/bin/python3,
# outside the chroot, and starts everything else inside it).
cat >"$W/driver.py" <<'EOF'
import hashlib, json, os, signal, stat, subprocess, sys, time

ROOT, WORK, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
STATE = ROOT + "/run/dtrace"
HELPER = "/dev/dtrace/helper"
ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "HOME=/root"]
HOLD = "LD_PRELOAD=" + WORK + "/fxhold.so"
T = time.monotonic()


def note(msg):
    print(f"[driver {time.monotonic() - T:7.1f}s] {msg}", file=sys.stderr, flush=True)


def wait_for(pred, what, limit=60.0):
    end = time.monotonic() + limit
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError("timed out waiting for " + what)
        time.sleep(0.05)


KIND = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l"}


def walk(top, rel=""):
    path = os.path.join(top, rel) if rel else top
    yield rel, path
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(path)):
            yield from walk(top, os.path.join(rel, name) if rel else name)


def snapshot(dest, label):
    os.makedirs(dest)
    tree = os.path.join(dest, "tree")
    entries = []
    for rel, path in walk(STATE):
        st = os.lstat(path)
        e = {
            "path": rel or ".",
            "type": KIND.get(stat.S_IFMT(st.st_mode), "?"),
            "mode": "%04o" % stat.S_IMODE(st.st_mode),
            "nlink": st.st_nlink,
            "ino": st.st_ino,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "size": st.st_size,
            "blocks": st.st_blocks,
        }
        out = os.path.join(tree, rel) if rel else tree
        if e["type"] == "d":
            os.makedirs(out, exist_ok=True)
        elif e["type"] == "l":
            e["target"] = os.readlink(path)
            os.symlink(e["target"], out)
        elif e["type"] == "f":
            with open(path, "rb") as f:
                data = f.read()
            e["sha256"] = hashlib.sha256(data).hexdigest()
            with open(out, "wb") as f:
                f.write(data)
        x = {}
        for name in os.listxattr(path, follow_symlinks=False):
            x[name] = os.getxattr(path, name, follow_symlinks=False).hex()
        if x:
            e["xattrs"] = x
        entries.append(e)
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump({"step": label, "state_dir": "/run/dtrace", "entries": entries}, f, indent=1)
        f.write("\n")
    with open(os.path.join(dest, "manifest.txt"), "w") as f:
        f.write("# ino type mode nlink size blocks sha256|->target path   (tmpfs inodes grow in creation order)\n")
        for e in entries:
            extra = e.get("sha256", "->" + e["target"] if "target" in e else "-")
            f.write(f'{e["ino"]} {e["type"]} {e["mode"]} {e["nlink"]} {e["size"]} {e["blocks"]} {extra} {e["path"]}\n')
    with open(os.path.join(dest, "find.txt"), "w") as f:
        subprocess.run(["find", STATE, "-printf", r"%i %y %#m %n %s %P -> %l\n"], stdout=f, check=True)
    note(f"snapshot {dest[len(OUT) + 1:]}: {len(entries)} entries")


class Daemon:
    def __init__(self, logpath, fresh=True):
        if fresh:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", ROOT + "/run"], check=True)
        wait_for(lambda: not os.path.exists(HELPER), "the previous helper to go")
        time.sleep(0.5)   # the node goes before the old CUSE device's name is free
        self.log = open(logpath, "a")
        self.p = subprocess.Popen(["chroot", ROOT, *ENV, "/usr/sbin/dtprobed", "-F"],
                                  stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.p.poll() is not None or
                     (os.path.exists(HELPER) and os.path.isdir(STATE + "/stash")), "dtprobed", 30)
            if self.p.poll() is not None:
                ls = subprocess.run(["ls", "-l", "/dev/cuse", ROOT + "/dev/cuse", "/dev/dtrace"],
                                    capture_output=True, text=True)
                raise RuntimeError(f"dtprobed exited {self.p.returncode}: {ls.stdout}{ls.stderr}")
        except Exception:
            self.stop()
            raise
        time.sleep(0.5)   # prune and reparse of an empty stash, then the loop
        note(f"dtprobed pid {self.p.pid} up")

    def stop(self, keep=False):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        rc = self.p.wait(30)
        self.log.write(f"# exit status {rc}\n")
        self.log.close()
        if not keep:
            subprocess.run(["umount", ROOT + "/run"], check=True)


class Prog:
    """A program in the chroot. drti's DTRACE_DOF_INIT_DEBUG is on (it only prints to stderr:
    "DRTI: Ioctl OK (gen N)", "DRTI: Ioctl failed", ...); stderr goes to a file, read by
    drti_log() at any time."""

    count = 0

    def __init__(self, argv, hold=True):
        env = [*ENV, HOLD] if hold else [*ENV]
        env.append("DTRACE_DOF_INIT_DEBUG=1")
        Prog.count += 1
        self.errpath = f"/tmp/prog-{Prog.count}.stderr"
        with open(self.errpath, "w") as err:
            self.p = subprocess.Popen(["chroot", ROOT, *env, *argv], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        self.pid = self.p.pid
        self.replies = []

    def stderr(self):
        with open(self.errpath) as f:
            return f.read()

    def expect_ok(self, n):
        """drti has reported n successful registrations (a check that the golden is one)."""
        wait_for(lambda: self.stderr().count("DRTI: Ioctl OK") >= n, f"{n} x 'DRTI: Ioctl OK'", 10)

    def line(self):
        ln = self.p.stdout.readline()
        if not ln:
            raise RuntimeError(f"{self.pid}: no answer; stderr: {self.stderr()!r}")
        self.replies.append(ln.rstrip("\n"))
        return ln.split()

    def cmd(self, c):
        self.replies.append("> " + c)
        self.p.stdin.write(c + "\n")
        self.p.stdin.flush()
        return self.line()

    def maps(self, pid=None):
        with open(f"/proc/{pid or self.pid}/maps") as f:
            return f.read().splitlines()

    def quit(self, c="q", answer=True):
        if answer:
            self.cmd(c)
        else:
            self.replies.append("> " + c)
            self.p.stdin.write(c + "\n")
        self.p.stdin.close()
        rc = self.p.wait(30)
        self.replies.append(f"# exit status {rc}; stderr: {self.stderr()!r}")
        return rc


def readelf(name):
    with open(ROOT + WORK + "/" + name + ".readelf.txt") as f:
        return f.read()


def scenario(name, body):
    d = os.path.join(OUT, name)
    os.makedirs(d)
    info = {"scenario": name, "objects": {}, "processes": {}, "notes": []}
    daemons = [Daemon(os.path.join(d, "daemon.log"))]
    step = [0]

    def snap(label):
        step[0] += 1
        snapshot(os.path.join(d, f"{step[0]:02d}-{label}"), label)

    def restart():
        daemons.pop().stop(keep=True)
        daemons.append(Daemon(os.path.join(d, "daemon.log"), fresh=False))

    snap.restart = restart
    try:
        body(info, snap)
    finally:
        if daemons:
            daemons[-1].stop()
            info["daemon_pids"] = [dm.p.pid for dm in daemons]
        else:
            subprocess.run(["umount", ROOT + "/run"])
        with open(os.path.join(d, "info.json"), "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")


def proc_info(p, obj, role):
    maps = p.maps()
    return {"pid": p.pid, "role": role, "object": obj, "drti_stderr": p.stderr(),
            "object_maps": [m for m in maps if m.endswith("/" + obj)],
            "maps": maps}


def held_program(obj):
    def body(info, snap):
        info["objects"][obj] = readelf(obj)
        p = Prog([WORK + "/" + obj])
        p.line()
        p.expect_ok(1)
        info["processes"]["main"] = proc_info(p, obj, "registers " + obj + " from its constructor")
        snap("registered")
        p.quit()
        info["processes"]["main"]["replies"] = p.replies
        snap("exited")
    return body


def fork_body(info, snap):
    obj = "fx_exec"
    info["objects"][obj] = readelf(obj)
    p = Prog([WORK + "/" + obj])
    p.line()
    info["processes"]["parent"] = proc_info(p, obj, "parent")
    snap("registered")
    child = int(p.cmd("k")[3])
    p.expect_ok(2)
    info["processes"]["child"] = dict(proc_info(p, obj, "fork child"), pid=child,
                                      maps=p.maps(child))
    info["processes"]["child"]["object_maps"] = [m for m in p.maps(child) if m.endswith("/" + obj)]
    snap("forked")
    os.kill(child, signal.SIGTERM)
    p.cmd("w")
    snap("child-exited")
    p.quit()
    info["processes"]["parent"]["replies"] = p.replies
    snap("exited")


def twice_body(info, snap):
    obj = "fx_exec"
    info["objects"][obj] = readelf(obj)
    a = Prog([WORK + "/" + obj]); a.line(); a.expect_ok(1)
    b = Prog([WORK + "/" + obj]); b.line(); b.expect_ok(1)
    info["processes"]["first"] = proc_info(a, obj, "first process")
    info["processes"]["second"] = proc_info(b, obj, "second process, same object")
    snap("both-registered")
    a.quit()
    snap("first-exited")
    b.quit()
    snap("exited")
    info["processes"]["first"]["replies"] = a.replies
    info["processes"]["second"]["replies"] = b.replies


def libfx_body(info, snap):
    info["objects"]["libfx.so"] = readelf("libfx.so")
    info["objects"]["fxload"] = readelf("fxload")
    p = Prog([WORK + "/fxload"])
    p.line()
    snap("started")
    p.cmd("o " + WORK + "/libfx.so")
    p.expect_ok(1)
    info["processes"]["loader"] = proc_info(p, "libfx.so", "dlopens libfx.so")
    snap("dlopened")
    p.cmd("c")
    info["processes"]["loader"]["maps_after_dlclose"] = p.maps()
    snap("dlclosed")
    p.quit()
    info["processes"]["loader"]["replies"] = p.replies
    snap("exited")


def exec_lib_body(info, snap):
    info["objects"]["fx_exec"] = readelf("fx_exec")
    info["objects"]["libfx.so"] = readelf("libfx.so")
    p = Prog([WORK + "/fx_exec"])
    p.line()
    p.expect_ok(1)
    info["processes"]["main"] = proc_info(p, "fx_exec", "registers fx_exec (gen 0), then dlopens libfx.so (gen 1)")
    snap("registered")
    p.cmd("o " + WORK + "/libfx.so")
    p.expect_ok(2)
    info["processes"]["main"]["libfx_maps"] = [m for m in p.maps() if m.endswith("/libfx.so")]
    info["processes"]["main"]["maps"] = p.maps()
    snap("dlopened")
    p.cmd("c")
    snap("dlclosed")
    p.quit()
    info["processes"]["main"]["replies"] = p.replies
    snap("exited")


def exec_body(first, second):
    def body(info, snap):
        info["objects"][first] = readelf(first)
        info["objects"][second] = readelf(second)
        p = Prog([WORK + "/" + first])
        p.line()
        p.expect_ok(1)
        info["processes"]["before"] = proc_info(p, first, f"runs {first}, then execs {second}")
        snap("registered")
        p.cmd("x " + WORK + "/" + second)   # answered by the new image's "held" line
        info["processes"]["after"] = proc_info(p, second, f"the same pid after exec of {second}")
        snap("execed")
        p.quit()
        info["processes"]["before"]["replies"] = p.replies
        snap("exited")
    return body


def killed_body(info, snap):
    obj = "fx_exec"
    info["objects"][obj] = readelf(obj)
    p = Prog([WORK + "/" + obj])
    p.line()
    p.expect_ok(1)
    info["processes"]["main"] = proc_info(p, obj, "SIGKILLed: no REMOVE")
    snap("registered")
    p.p.kill()
    p.p.wait(30)
    info["processes"]["main"]["stderr"] = p.stderr()
    snap("killed")
    snap.restart()   # a new dtprobed on the same state directory prunes the dead pid
    snap("restarted")


def adddof_body(info, snap):
    obj = "dtprobed-test-client"
    info["objects"][obj] = readelf(obj)
    p = Prog([WORK + "/" + obj, HELPER, WORK + "/probes.dof", "open",
              "add " + obj, "stdin"], hold=False)
    p.line()
    gen = int(p.line()[1])
    info["processes"]["client"] = proc_info(p, obj, "ADDDOF of probes.dof mapped from a file")
    info["processes"]["client"]["dof_maps"] = [m for m in p.maps() if m.endswith("/probes.dof")]
    snap("added")
    p.cmd(f"remove {gen}")
    snap("removed")
    p.quit("exit", answer=False)
    info["processes"]["client"]["replies"] = p.replies
    snap("exited")


SCENARIOS = [
    ("fx_exec", held_program("fx_exec")),
    ("fx_isenabled", held_program("fx_isenabled")),
    ("fx_kinds", held_program("fx_kinds")),
    ("libfx", libfx_body),
    ("fork", fork_body),
    ("twice", twice_body),
    ("exec_lib", exec_lib_body),
    ("adddof", adddof_body),
    ("exec_other", exec_body("fx_exec", "fx_kinds")),
    ("exec_same", exec_body("fx_exec", "fx_exec")),
    ("killed", killed_body),
]
only = os.environ.get("GOLDEN_ONLY")
failed = 0
for name, body in SCENARIOS:
    if only and name not in only.split(","):
        continue
    note(f"scenario {name}")
    try:
        scenario(name, body)
    except Exception as exc:  # keep going: report which scenario failed
        failed += 1
        note(f"scenario {name} FAILED: {exc!r}")
        with open(os.path.join(OUT, name, "FAILED"), "w") as f:
            f.write(repr(exc) + "\n")
note(f"done, {failed} failed")
sys.exit(1 if failed else 0)
EOF

STAGE=/var/cache/dtprobed-py/goldens-out
rm -rf "$STAGE"
mkdir -p "$STAGE"
status=0
for run in $(seq 1 "$RUNS"); do
    log "run $run: VM"
    t=$(date +%s)
    "$REPO/tools/cuse-vm/cuse-vm.sh" --timeout 600 --no-cwd --share "$STAGE" -- \
        bash "$SELF" --guest "$ROOT" "$STAGE/run$run" || { status=$?; log "run $run: exit $status"; }
    log "run $run: $(($(date +%s) - t)) s"
done

log "collecting into $OUT"
mkdir -p "$OUT"
for d in "$STAGE"/run1/*/; do
    name=$(basename "$d")
    rm -rf "${OUT:?}/$name"
    mkdir -p "$OUT/$name"
    for run in $(seq 1 "$RUNS"); do
        [ -d "$STAGE/run$run/$name" ] && mv "$STAGE/run$run/$name" "$OUT/$name/run$run"
    done
done
mkdir -p "$OUT/objects"
for f in fxhold.c fxload.c probes.dof versions.txt \
         fx_exec.readelf.txt libfx.so.readelf.txt fx_isenabled.readelf.txt fx_kinds.readelf.txt \
         fxload.readelf.txt dtprobed-test-client.readelf.txt; do
    cp "$W/$f" "$OUT/objects/$f"
done
(cd "$W" && sha256sum fx_exec libfx.so fx_isenabled fx_kinds fxload dtprobed-test-client fxhold.so probes.dof) \
    >"$OUT/objects/SHA256SUMS"
rm -rf "$STAGE"
log "done in $(($(date +%s) - T0)) s (exit $status)"
exit "$status"
