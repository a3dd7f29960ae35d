/*
 * main() of the executables tests/support/sunw_dof.py builds: it fires the
 * probes of its own object (generated probes.c, prefix sunw_self_) and of one
 * dlopened library built by the same builder (prefix sunw_lib_, found with
 * dlsym), on command.
 *
 * It prints "PID ready" first, then reads one command per line on stdin and
 * answers each with one line "PID ok CMD ..." (or "PID error ..."), flushed:
 *   f P N    fire probe P (index over all providers, in order) N times
 *   e P      evaluate probe P's is-enabled site once: "PID ok e P 0|1"
 *   i        this object's registration: "PID ok i gen=G errno=E regs=N mod=M
 *            addr=0xA dof=0xD" ("PID ok i none" without DOF)
 *   o PATH   dlopen(PATH, RTLD_NOW)
 *   l P N, le P, li   the same as f, e, i for the library
 *   c        dlclose the library (its destructor sends DTRACEHIOC_REMOVE)
 *   k        fork a child: it prints "CHILDPID ready", reads its commands from a
 *            pipe ("> CMD" forwards one) and answers them like the parent;
 *            "PID ok k CHILDPID"
 *   w        close the child's pipe and wait for it: "PID ok w STATUS"
 *   q        exit(0)
 * End of input also exits.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int sunw_self_fire(int probe, int n);
int sunw_self_enabled(int probe);
void sunw_self_info(char *buf, size_t len);

static void *lib;
static int (*lib_fire)(int, int);
static int (*lib_enabled)(int);
static void (*lib_info)(char *, size_t);
static FILE *child_in;
static pid_t child;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
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

static void serve(FILE *in);

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
		close(fds[1]);
		if (child_in)
			fclose(child_in);
		child_in = NULL;
		say("ready");
		serve(fdopen(fds[0], "r"));
		exit(0);
	}
	close(fds[0]);
	child_in = fdopen(fds[1], "w");
	say("ok k %d", (int)child);
}

static void fire(int (*fn)(int, int), const char *cmd, const char *arg)
{
	int p = -1, n = -1;

	if (!fn) {
		say("error %s: library not open", cmd);
		return;
	}
	if (!arg || sscanf(arg, "%d %d", &p, &n) != 2 || n < 0 || fn(p, n) < 0) {
		say("error %s: bad probe or count: %s", cmd, arg ? arg : "");
		return;
	}
	say("ok %s %d %d", cmd, p, n);
}

static void enabled(int (*fn)(int), const char *cmd, const char *arg)
{
	int p = arg ? atoi(arg) : -1, r;

	if (!fn) {
		say("error %s: library not open", cmd);
		return;
	}
	if ((r = fn(p)) < 0) {
		say("error %s: probe %d has no is-enabled site", cmd, p);
		return;
	}
	say("ok %s %d %d", cmd, p, r);
}

static void serve(FILE *in)
{
	char line[8192];

	while (fgets(line, sizeof(line), in)) {
		char cmd[8] = "", info[512];
		const char *arg;
		size_t len;

		line[strcspn(line, "\n")] = '\0';
		len = strcspn(line, " ");
		if (len == 0)
			continue;
		if (len >= sizeof(cmd)) {
			say("error unknown command: %s", line);
			continue;
		}
		memcpy(cmd, line, len);
		arg = line[len] == ' ' ? line + len + 1 : NULL;
		if (!strcmp(cmd, "f")) {
			fire(sunw_self_fire, cmd, arg);
		} else if (!strcmp(cmd, "l")) {
			fire(lib_fire, cmd, arg);
		} else if (!strcmp(cmd, "e")) {
			enabled(sunw_self_enabled, cmd, arg);
		} else if (!strcmp(cmd, "le")) {
			enabled(lib_enabled, cmd, arg);
		} else if (!strcmp(cmd, "i")) {
			sunw_self_info(info, sizeof(info));
			say("ok i %s", info);
		} else if (!strcmp(cmd, "li")) {
			if (!lib_info) {
				say("error li: library not open");
				continue;
			}
			lib_info(info, sizeof(info));
			say("ok li %s", info);
		} else if (!strcmp(cmd, "o")) {
			if (lib || !arg) {
				say("error o: already open, or no path");
				continue;
			}
			lib = dlopen(arg, RTLD_NOW);
			if (lib) {
				lib_fire = (int (*)(int, int))dlsym(lib, "sunw_lib_fire");
				lib_enabled = (int (*)(int))dlsym(lib, "sunw_lib_enabled");
				lib_info = (void (*)(char *, size_t))dlsym(lib, "sunw_lib_info");
			}
			if (!lib || !lib_fire || !lib_enabled || !lib_info) {
				say("error o: %s", dlerror());
				continue;
			}
			say("ok o %s", arg);
		} else if (!strcmp(cmd, "c")) {
			if (!lib) {
				say("error c: library not open");
				continue;
			}
			lib_fire = NULL;
			lib_enabled = NULL;
			lib_info = NULL;
			dlclose(lib);
			lib = NULL;
			say("ok c");
		} else if (!strcmp(cmd, "k")) {
			do_fork();
		} else if (!strcmp(cmd, ">")) {
			if (!child_in || !arg) {
				say("error >: no child or no command");
				continue;
			}
			fprintf(child_in, "%s\n", arg);
			fflush(child_in);
			say("ok >");
		} else if (!strcmp(cmd, "w")) {
			int status = -1;

			if (!child) {
				say("error w: no child");
				continue;
			}
			fclose(child_in);
			child_in = NULL;
			waitpid(child, &status, 0);
			child = 0;
			say("ok w %d", status);
		} else if (!strcmp(cmd, "q")) {
			say("ok q");
			exit(0);
		} else {
			say("error unknown command: %s", line);
		}
	}
}

int main(void)
{
	say("ready");
	serve(stdin);
	return 0;
}
