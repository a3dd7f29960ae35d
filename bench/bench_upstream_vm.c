/*
 * LD_PRELOAD shim for bench/bench_upstream_vm.py: times every
 * ioctl(DTRACEHIOC_ADDDOF) the program makes (its constructor's, and the one
 * drti's atfork handler makes in a fork child) with CLOCK_MONOTONIC around the
 * real call, and appends "PID NS RESULT ERRNO" to the file named by
 * BENCH_IOCTL_LOG. Every other ioctl goes straight through.
 *
 *   gcc -O2 -shared -fPIC -o bench_upstream_vm.so bench_upstream_vm.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define DTRACEHIOC_ADDDOF 0x4050D803UL

int ioctl(int fd, unsigned long request, ...)
{
	static int (*real)(int, unsigned long, ...);
	struct timespec a, b;
	va_list ap;
	void *arg;
	int ret, err, out, n;
	char line[96];
	const char *path;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (!real)
		real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
	if (request != DTRACEHIOC_ADDDOF)
		return real(fd, request, arg);
	clock_gettime(CLOCK_MONOTONIC, &a);
	ret = real(fd, request, arg);
	err = ret < 0 ? errno : 0;
	clock_gettime(CLOCK_MONOTONIC, &b);
	path = getenv("BENCH_IOCTL_LOG");
	if (path) {
		long long ns = (b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec);
		n = snprintf(line, sizeof(line), "%d %lld %d %d\n", (int)getpid(), ns, ret, err);
		out = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
		if (out >= 0) {
			if (write(out, line, n) != n)
				(void)0;
			close(out);
		}
	}
	errno = err;
	return ret;
}
