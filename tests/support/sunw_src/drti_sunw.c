/*
 * A DOF registration constructor modelled on the drti.o of dtrace <= 2.0.2
 * (libdtrace/drti.c; reference: /work/shared/reference/upstream-dtprobed.md
 * section 1.3), written for dtprobed-py's tests. Linked into every object that
 * tests/support/sunw_dof.py builds with a .SUNW_dof section.
 *
 * Constructor (dtrace_dof_init):
 *   - DTRACE_DOF_INIT_DISABLE set: do nothing;
 *   - DTRACE_DOF_INIT_DEBUG set: messages on stderr ("sunw-drti: ...");
 *   - DTRACE_DOF_INIT_DEVNAME: the helper path (default /dev/dtrace/helper);
 *   - finds its own object in /proc/self/maps (the line holding
 *     dtrace_dof_init, then the first line with the same path: its start is
 *     l_addr), modname = that path's basename;
 *   - checks the DOF magic; dofhp_addr = l_addr for ET_DYN, 0 for ET_EXEC;
 *     dofhp_dof = &__SUNW_dof (the section's address in memory);
 *   - open(devname, O_RDWR, O_CLOEXEC) (sic: O_CLOEXEC in the mode argument,
 *     as upstream), gen = ioctl(fd, DTRACEHIOC_ADDDOF, &dh), close(fd);
 *   - pthread_atfork(NULL, NULL, register): fork children register again.
 * Destructor (dtrace_dof_fini, also run at dlclose): open the helper again,
 * ioctl(fd, DTRACEHIOC_REMOVE, gen) with the generation BY VALUE, close.
 *
 * For the tests (not in upstream): sunw_drti_state() formats what the
 * constructor did: "gen=G errno=E regs=N mod=M addr=0xA dof=0xD", where regs
 * counts ADDDOF attempts in this process and errno is the last ADDDOF's.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define DTRACEHIOC_REMOVE 0x4004D802UL
#define DTRACEHIOC_ADDDOF 0x4050D803UL

typedef struct dof_helper {
	char dofhp_mod[64];
	uint64_t dofhp_addr;
	uint64_t dofhp_dof;
} dof_helper_t;

/* The start of this object's .SUNW_dof section (defined in the generated dof.S). */
extern const unsigned char __SUNW_dof[] __attribute__((visibility("hidden")));

static const char *devname = "/dev/dtrace/helper";
static int gen;
static int last_errno;
static int registrations;
static int debug;
static dof_helper_t dh; /* static, as in drti.c: bytes after the NUL are zero */

#define dprintf(...)                                              \
	do {                                                      \
		if (debug) {                                      \
			fprintf(stderr, "sunw-drti: " __VA_ARGS__); \
			fputc('\n', stderr);                      \
		}                                                 \
	} while (0)

static void dtrace_dof_init(void) __attribute__((constructor));
static void dtrace_dof_fini(void) __attribute__((destructor));

/* The object that holds ADDR: (path, start of its first mapping), from /proc/self/maps. */
static int find_self(uintptr_t addr, char *path, size_t pathlen, uintptr_t *base)
{
	char line[4096 + 256];
	FILE *maps = fopen("/proc/self/maps", "re");
	int found = 0;

	if (!maps)
		return -1;
	path[0] = '\0';
	while (!found && fgets(line, sizeof(line), maps)) {
		unsigned long lo, hi;
		int off = 0;

		if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &lo, &hi, &off) < 2 || off == 0)
			continue;
		if (addr >= lo && addr < hi) {
			snprintf(path, pathlen, "%s", line + off);
			path[strcspn(path, "\n")] = '\0';
			found = 1;
		}
	}
	if (!found || path[0] != '/') {
		fclose(maps);
		return -1;
	}
	rewind(maps);
	while (fgets(line, sizeof(line), maps)) {
		unsigned long lo, hi;
		int off = 0;

		if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &lo, &hi, &off) < 2 || off == 0)
			continue;
		line[strcspn(line, "\n")] = '\0';
		if (strcmp(line + off, path) == 0) {
			*base = lo;
			fclose(maps);
			return 0;
		}
	}
	fclose(maps);
	return -1;
}

static void dtrace_dof_register(void)
{
	int fd;

	registrations++;
	if ((fd = open(devname, O_RDWR, O_CLOEXEC)) < 0) {
		last_errno = errno;
		dprintf("failed to open helper device %s", devname);
		return;
	}
	gen = ioctl(fd, DTRACEHIOC_ADDDOF, &dh);
	last_errno = gen == -1 ? errno : 0;
	if (gen == -1)
		dprintf("ioctl failed for DOF at %p: %s", (const void *)__SUNW_dof,
			strerror(last_errno));
	else
		dprintf("ioctl succeeded for DOF at %p: gen %d", (const void *)__SUNW_dof, gen);
	close(fd);
}

static void dtrace_dof_init(void)
{
	const unsigned char *dof = __SUNW_dof;
	char path[4096];
	const char *modname, *p;
	uintptr_t l_addr = 0;
	const Elf64_Ehdr *elf;

	if (getenv("DTRACE_DOF_INIT_DISABLE") != NULL)
		return;
	if (getenv("DTRACE_DOF_INIT_DEBUG") != NULL)
		debug = 1;
	if (find_self((uintptr_t)dtrace_dof_init, path, sizeof(path), &l_addr) < 0) {
		dprintf("cannot find this object in /proc/self/maps");
		return;
	}
	modname = strrchr(path, '/') + 1;
	if (dof[0] != 0x7f || dof[1] != 'D' || dof[2] != 'O' || dof[3] != 'F') {
		dprintf("invalid DOF");
		return;
	}
	elf = (const Elf64_Ehdr *)l_addr;
	strncpy(dh.dofhp_mod, modname, sizeof(dh.dofhp_mod)); /* lmid 0: no "LM0`" prefix */
	dh.dofhp_addr = elf->e_type == ET_DYN ? l_addr : 0;
	dh.dofhp_dof = (uintptr_t)dof;
	if ((p = getenv("DTRACE_DOF_INIT_DEVNAME")) != NULL)
		devname = p;
	pthread_atfork(NULL, NULL, dtrace_dof_register);
	dtrace_dof_register();
}

static void dtrace_dof_fini(void)
{
	int fd;

	if ((fd = open(devname, O_RDWR | O_CLOEXEC)) < 0) {
		dprintf("failed to open helper device %s", devname);
		return;
	}
	if (ioctl(fd, DTRACEHIOC_REMOVE, gen) == -1)
		dprintf("ioctl failed to remove DOF (gen %d): %s", gen, strerror(errno));
	else
		dprintf("ioctl removed DOF (gen %d)", gen);
	close(fd);
}

__attribute__((visibility("hidden"))) void sunw_drti_state(char *buf, size_t len)
{
	char mod[sizeof(dh.dofhp_mod) + 1];

	memcpy(mod, dh.dofhp_mod, sizeof(dh.dofhp_mod));
	mod[sizeof(dh.dofhp_mod)] = '\0';
	snprintf(buf, len, "gen=%d errno=%d regs=%d mod=%s addr=0x%llx dof=0x%llx", gen,
		 last_errno, registrations, mod[0] ? mod : "-",
		 (unsigned long long)dh.dofhp_addr, (unsigned long long)dh.dofhp_dof);
}
