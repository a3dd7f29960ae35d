/*
 * Provider of the test executable usdtprog (tests/realdtrace/progs/usdtprog.c).
 * Built with the chroot's `dtrace -h` (header) and `dtrace -G` (object).
 */
provider rdtmain {
	/* fired once per "s" command: a label and the process id */
	probe start(char *, int);
	/* fired N times by "f N [B]": the index and B + index * 1000 */
	probe tick(int, uint64_t);
	/* fired once at the end of "f N": the count (name in D: done-all) */
	probe done__all(int);
};
