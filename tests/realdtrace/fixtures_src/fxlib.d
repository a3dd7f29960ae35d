/* Provider of the fixture libfx.so (a shared library). */
provider fxlib {
	probe call(int, char *);
	probe enter();
};
