/* Provider of the fixture fx_isenabled (a non-PIE ET_EXEC executable). */
provider fxen {
	probe work(int, char *);
	probe idle();
};
