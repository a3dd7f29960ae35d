/*
 * Shared library with its own USDT provider (rdtlib.d), dlopen()ed and dlclose()d by
 * usdtprog on command. drti linked into it registers the library from its constructor and
 * removes it from its destructor (at dlclose).
 */
#include "rdtlib.h"

void rdtlib_fire(int n);

void rdtlib_fire(int n)
{
	RDTLIB_ENTER();
	for (int i = 0; i < n; i++)
		RDTLIB_CALL(i, "usdtlib");
}
