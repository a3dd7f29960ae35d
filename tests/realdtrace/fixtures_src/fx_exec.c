/* Fixture: PIE executable with one provider, three probes with typed arguments. */
#include <stdint.h>
#include "fxexec.h"

int main(int argc, char **argv)
{
	FXEXEC_START(argv[0], argc);
	for (int i = 0; i < argc; i++)
		FXEXEC_TICK(i, (uint64_t)i * 1000);
	FXEXEC_DONE_ALL(argc);
	return 0;
}
