/*
 * Test program for the interop tests: a USDT provider (rdtmain.d) whose probes fire only
 * when the test says so. Built in the chroot by build.sh with `dtrace -h` and `dtrace -G`;
 * driven by tests/realdtrace/partner.py.
 *
 * It prints "PID ready" first, then reads one command per line on stdin and answers every
 * command with one line "PID ok CMD ..." (or "PID error ..."), flushed:
 *   s        fire rdtmain:::start("usdtprog", pid) once
 *   f N [B]  fire rdtmain:::tick(i, B + i * 1000) for i = 0..N-1 (B: a uint64_t, default 0),
 *            then rdtmain:::done-all(N)
 *   e        report RDTMAIN_TICK_ENABLED() (an is-enabled probe site): "PID ok e N"
 *   o [LIB]  dlopen LIB (default: libusdtlib.so next to this program)
 *   l N      call rdtlib_fire(N) in the library (rdtlib:::enter once, rdtlib:::call N times)
 *   c        dlclose the library
 *   k        fork a child; the child prints "CHILDPID ready", reads its commands from a pipe
 *            and answers them like the parent; drti registers again in the child
 *   > CMD    forward CMD to the child
 *   w        close the child's pipe, wait for it: "PID ok w STATUS"
 *   m        report the run-time address of main(): "PID ok m 0xADDR" (with nm's value of
 *            main, it gives the load base, to check the address drti passes to the daemon)
 *   q        exit(0) (the destructor sends DTRACEHIOC_REMOVE)
 * End of input also exits.
 */
#include <dlfcn.h>
#include <errno.h>
#include <libgen.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "rdtmain.h"

static void *lib;
static void (*lib_fire)(int);
static FILE *child_in;
static pid_t child;
static char self_dir[4096];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#include <stdarg.h>
static void say(const char *fmt, ...)
{
	va_list ap;

	printf("%d ", (int)getpid());
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static void fire_ticks(int n, uint64_t base)
{
	for (int i = 0; i < n; i++)
		RDTMAIN_TICK(i, base + (uint64_t)i * 1000);
	RDTMAIN_DONE_ALL(n);
}

static void serve(FILE *in);
int main(int argc, char **argv);

static void do_fork(void)
{
	int fds[2];

	if (child) {
		say("error k: a child is running");
		return;
	}
	if (pipe(fds) < 0) {
		say("error k: pipe: %s", strerror(errno));
		return;
	}
	fflush(stdout);
	child = fork();
	if (child < 0) {
		say("error k: fork: %s", strerror(errno));
		child = 0;
		return;
	}
	if (child == 0) {
		FILE *in;

		close(fds[1]);
		if (child_in)
			fclose(child_in);
		in = fdopen(fds[0], "r");
		say("ready");
		serve(in);
		exit(0);
	}
	close(fds[0]);
	child_in = fdopen(fds[1], "w");
	say("ok k %d", (int)child);
}

static void serve(FILE *in)
{
	char line[4096];

	while (fgets(line, sizeof(line), in)) {
		char *arg;
		int n;

		line[strcspn(line, "\n")] = '\0';
		arg = line[0] && line[1] == ' ' ? line + 2 : NULL;
		n = arg ? atoi(arg) : 0;
		switch (line[0]) {
		case '\0':
			continue;
		case 's':
			RDTMAIN_START("usdtprog", (int)getpid());
			say("ok s");
			break;
		case 'f':
			fire_ticks(n, arg && strchr(arg, ' ') ? strtoull(strchr(arg, ' ') + 1, NULL, 0) : 0);
			say("ok f %d", n);
			break;
		case 'e':
			say("ok e %d", RDTMAIN_TICK_ENABLED() ? 1 : 0);
			break;
		case 'o': {
			char path[8192];

			if (lib) {
				say("error o: already open");
				break;
			}
			if (arg)
				snprintf(path, sizeof(path), "%s", arg);
			else
				snprintf(path, sizeof(path), "%s/libusdtlib.so", self_dir);
			lib = dlopen(path, RTLD_NOW);
			lib_fire = lib ? (void (*)(int))dlsym(lib, "rdtlib_fire") : NULL;
			if (!lib_fire) {
				say("error o: %s", dlerror());
				break;
			}
			say("ok o %s", path);
			break;
		}
		case 'l':
			if (!lib_fire) {
				say("error l: library not open");
				break;
			}
			lib_fire(n);
			say("ok l %d", n);
			break;
		case 'c':
			if (!lib) {
				say("error c: library not open");
				break;
			}
			dlclose(lib);
			lib = NULL;
			lib_fire = NULL;
			say("ok c");
			break;
		case 'k':
			do_fork();
			break;
		case '>':
			if (!child_in || !arg) {
				say("error >: no child or no command");
				break;
			}
			fprintf(child_in, "%s\n", arg);
			fflush(child_in);
			say("ok >");
			break;
		case 'w': {
			int status = -1;

			if (!child) {
				say("error w: no child");
				break;
			}
			fclose(child_in);
			child_in = NULL;
			waitpid(child, &status, 0);
			child = 0;
			say("ok w %d", status);
			break;
		}
		case 'm':
			say("ok m %p", (void *)main);
			break;
		case 'q':
			say("ok q");
			exit(0);
		default:
			say("error unknown command: %s", line);
		}
	}
}

int main(int argc, char **argv)
{
	char exe[4096];
	ssize_t len;

	(void)argc;
	(void)argv;
	len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (len > 0) {
		exe[len] = '\0';
		snprintf(self_dir, sizeof(self_dir), "%s", dirname(exe));
	} else {
		snprintf(self_dir, sizeof(self_dir), ".");
	}
	say("ready");
	serve(stdin);
	return 0;
}
