/* Provider of the fixture fx_exec (a PIE executable). */
provider fxexec {
	probe start(char *, int);
	probe tick(int, uint64_t);
	probe done__all(int);
};
