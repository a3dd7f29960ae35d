/*
 * Provider of the test shared library libusdtlib.so (tests/realdtrace/progs/usdtlib.c).
 */
provider rdtlib {
	/* fired N times by rdtlib_fire(N): the index and a label */
	probe call(int, char *);
	/* fired once on every rdtlib_fire() call, no arguments */
	probe enter();
};
