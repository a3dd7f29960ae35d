/* Fixture: shared library with its own provider. */
#include "fxlib.h"

void fxlib_fire(int n);

void fxlib_fire(int n)
{
	FXLIB_ENTER();
	for (int i = 0; i < n; i++)
		FXLIB_CALL(i, "libfx");
}
