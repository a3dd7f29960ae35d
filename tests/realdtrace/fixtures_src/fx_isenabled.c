/*
 * Fixture: ET_EXEC (gcc -no-pie) executable using is-enabled probes: work has a regular
 * site and an is-enabled site; idle has only an is-enabled site and a regular one.
 */
#include "fxen.h"

int main(int argc, char **argv)
{
	if (FXEN_WORK_ENABLED())
		FXEN_WORK(argc, argv[0]);
	if (FXEN_IDLE_ENABLED())
		FXEN_IDLE();
	return 0;
}
