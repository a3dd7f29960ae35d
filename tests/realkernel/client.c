/*
 * A DTrace helper client that registers DOF as a program linked with
 * `dtrace -G` does (libdtrace/drti.c): open(dev, O_RDWR), then
 * gen = ioctl(fd, DTRACEHIOC_ADDDOF, &dh) with the DOF in a file-backed
 * mapping of the same object as the probe sites, later
 * ioctl(fd, DTRACEHIOC_REMOVE, gen) with the generation passed BY VALUE.
 *
 * The object is built at start-up in a memfd, laid out like a shared library:
 * TEXT_SIZE bytes of text (nops), mapped r-x where the kernel likes, then the
 * DOF file's bytes, mapped read-only from the same memfd.  dofhp_addr is
 * text - 0x401000, so the tests' tracepoint addresses (0x401000 and up, each
 * with a SETX relocation as dtrace -G emits) land in that text after the
 * parser's relocation, as the probes of a library loaded there would.  The
 * daemon refuses tracepoints outside the object the DOF is in.
 *
 *   gcc -O1 -o client client.c
 *
 * usage: client DEVICE DOF-FILE [COMMAND...]
 * The DOF is mapped with the length the DOF header's loadsz says (or the file
 * size if larger): a file shorter than loadsz leaves the tail
 * unmapped-beyond-EOF, so the kernel's copy of it fails.
 * Commands run in order; "stdin" then reads one command per line from stdin.
 *   open              open(DEVICE, O_RDWR)             -> "open OK|ERR errno"
 *   add [MOD]         ioctl ADDDOF, dofhp_mod MOD       -> "add RESULT ERRNO"
 *   remove GEN        ioctl REMOVE, GEN by value        -> "remove RESULT ERRNO"
 *   bench N           N x (ADDDOF), nanoseconds each   -> "bench NS NS ..."
 *   load N C          fork N children, at most C at a time; each opens the
 *                     device, does one ADDDOF, closes it and exits, as a
 *                     short-lived USDT program does
 *                     -> "load WALL_NS FAILED NS NS ..." (each child's open+ioctl+close)
 *   close             close the device
 *   pid               -> "pid PID"
 *   exit [CODE]       exit now
 * Every answer is one line on stdout, flushed at once.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* include/dtrace/ioctl.h */
#define DTRACEHIOC_REMOVE 0x4004D802UL
#define DTRACEHIOC_ADDDOF 0x4050D803UL

/* include/dtrace/helpers.h: 80 bytes */
typedef struct dof_helper {
	char dofhp_mod[64];
	uint64_t dofhp_addr;
	uint64_t dofhp_dof;
} dof_helper_t;

#define TRACEPOINT_BASE 0x401000UL
#define TEXT_SIZE (512UL << 10) /* the probe sites: tracepoint offsets below 512 KiB */

static const char *device;
static int fd = -1;
static const unsigned char *dof;
static uint64_t load_base; /* dofhp_addr: the object's text minus TRACEPOINT_BASE */
static dof_helper_t dh;	   /* static, as in drti.c: bytes after the NUL are zero */

static void die(const char *what)
{
	perror(what);
	exit(2);
}

/* The object: a memfd holding TEXT_SIZE bytes of nops, then the DOF file. */
static void map_dof(const char *path)
{
	int dfd = open(path, O_RDONLY | O_CLOEXEC);
	int ofd = memfd_create("dtprobed-test-object", MFD_CLOEXEC);
	static unsigned char buf[1 << 16];
	struct stat st;
	uint64_t loadsz = 0;
	size_t len;
	off_t at = TEXT_SIZE;
	ssize_t n;
	void *text;

	if (dfd < 0 || fstat(dfd, &st) < 0)
		die(path);
	if (ofd < 0)
		die("memfd_create");
	if (pread(dfd, &loadsz, sizeof(loadsz), 40) != sizeof(loadsz)) /* dofh_loadsz */
		loadsz = 0;
	len = (size_t)st.st_size > loadsz ? (size_t)st.st_size : loadsz;
	if (len == 0 || len > (1UL << 30)) {
		fprintf(stderr, "%s: unusable DOF size %zu\n", path, len);
		exit(2);
	}
	memset(buf, 0x90, sizeof(buf));
	for (off_t off = 0; off < (off_t)TEXT_SIZE; off += sizeof(buf))
		if (pwrite(ofd, buf, sizeof(buf), off) != (ssize_t)sizeof(buf))
			die("pwrite text");
	while ((n = read(dfd, buf, sizeof(buf))) > 0) {
		if (pwrite(ofd, buf, n, at) != n)
			die("pwrite dof");
		at += n;
	}
	if (n < 0)
		die(path);
	close(dfd);
	text = mmap(NULL, TEXT_SIZE, PROT_READ | PROT_EXEC, MAP_PRIVATE, ofd, 0);
	if (text == MAP_FAILED)
		die("mmap text");
	dof = mmap(NULL, len, PROT_READ, MAP_PRIVATE, ofd, TEXT_SIZE);
	if (dof == MAP_FAILED)
		die("mmap dof");
	close(ofd);
	load_base = (uintptr_t)text - TRACEPOINT_BASE;
}

static long add(const char *mod)
{
	memset(&dh, 0, sizeof(dh));
	strncpy(dh.dofhp_mod, mod, sizeof(dh.dofhp_mod) - 1);
	dh.dofhp_addr = load_base; /* ET_DYN: the load base */
	dh.dofhp_dof = (uintptr_t)dof;
	return ioctl(fd, DTRACEHIOC_ADDDOF, &dh);
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The load generator: the parent only forks and reaps, so the figure is the
 * daemon's, not a scripting language's fork cost. */
static void load(long n, long conc)
{
	struct slot {
		long long ns;
		long rc;
	} *slots;
	long started = 0, running = 0, failed = 0;
	long long t0;

	if (n <= 0 || conc <= 0 || n > 1000000) {
		printf("load ERR %d\n", EINVAL);
		return;
	}
	slots = mmap(NULL, n * sizeof(*slots), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
		     -1, 0);
	if (slots == MAP_FAILED) {
		printf("load ERR %d\n", errno);
		return;
	}
	fflush(stdout);
	t0 = now_ns();
	while (started < n || running > 0) {
		if (started < n && running < conc) {
			pid_t pid = fork();

			if (pid == 0) {
				long long c0 = now_ns();

				fd = open(device, O_RDWR | O_CLOEXEC);
				slots[started].rc = fd < 0 ? -errno : add("load");
				if (slots[started].rc < 0 && fd >= 0)
					slots[started].rc = -errno;
				close(fd);
				slots[started].ns = now_ns() - c0;
				_exit(0);
			}
			if (pid < 0) {
				slots[started].rc = -errno;
				slots[started].ns = 0;
			} else {
				running++;
			}
			started++;
			continue;
		}
		if (wait(NULL) > 0)
			running--;
	}
	printf("load %lld", now_ns() - t0);
	for (long i = 0; i < n; i++)
		failed += slots[i].rc < 0;
	printf(" %ld", failed);
	for (long i = 0; i < n; i++)
		printf(" %lld", slots[i].ns);
	printf("\n");
	munmap(slots, n * sizeof(*slots));
}

static void run(char *line)
{
	char *cmd = strtok(line, " \t\n");
	char *arg = strtok(NULL, " \t\n");
	long rc;

	if (cmd == NULL)
		return;
	errno = 0;
	if (strcmp(cmd, "open") == 0) {
		fd = open(device, O_RDWR | O_CLOEXEC);
		if (fd < 0)
			printf("open ERR %d\n", errno);
		else
			printf("open OK\n");
	} else if (strcmp(cmd, "add") == 0) {
		rc = add(arg ? arg : "client");
		printf("add %ld %d\n", rc, rc < 0 ? errno : 0);
	} else if (strcmp(cmd, "remove") == 0) {
		/* The generation travels in the argument itself, not behind a pointer. */
		rc = ioctl(fd, DTRACEHIOC_REMOVE, strtol(arg ? arg : "0", NULL, 0));
		printf("remove %ld %d\n", rc, rc < 0 ? errno : 0);
	} else if (strcmp(cmd, "bench") == 0) {
		long n = strtol(arg ? arg : "1", NULL, 0);

		printf("bench");
		for (long i = 0; i < n; i++) {
			long long t0 = now_ns();

			rc = add("client");
			if (rc < 0) {
				printf(" ERR%d", errno);
				break;
			}
			printf(" %lld", now_ns() - t0);
		}
		printf("\n");
	} else if (strcmp(cmd, "load") == 0) {
		char *conc = strtok(NULL, " \t\n");

		load(strtol(arg ? arg : "1", NULL, 0), strtol(conc ? conc : "1", NULL, 0));
	} else if (strcmp(cmd, "close") == 0) {
		close(fd);
		fd = -1;
		printf("close OK\n");
	} else if (strcmp(cmd, "pid") == 0) {
		printf("pid %d\n", (int)getpid());
	} else if (strcmp(cmd, "exit") == 0) {
		fflush(stdout);
		_exit(arg ? atoi(arg) : 0);
	} else if (strcmp(cmd, "stdin") == 0) {
		char buf[256];

		fflush(stdout);
		while (fgets(buf, sizeof(buf), stdin) != NULL)
			run(buf);
		return;
	} else {
		printf("unknown %s\n", cmd);
	}
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s DEVICE DOF-FILE [COMMAND...]\n", argv[0]);
		return 2;
	}
	device = argv[1];
	map_dof(argv[2]);
	for (int i = 3; i < argc; i++) {
		char buf[256];

		snprintf(buf, sizeof(buf), "%s", argv[i]);
		run(buf);
	}
	return 0;
}
