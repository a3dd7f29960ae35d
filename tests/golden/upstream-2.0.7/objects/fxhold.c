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
