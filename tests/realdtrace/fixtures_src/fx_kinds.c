/* Fixture: many probe kinds (see fxkinds.d). */
#include <stdint.h>
#include "fxkinds.h"

static int __attribute__((noinline)) helper(int n)
{
	FXKINDS_MULTI(n + 100);
	return n + 1;
}

int main(int argc, char **argv)
{
	FXKINDS_NOARGS();
	FXKINDS_MANY((uint8_t)argc, (int16_t)-argc, (uint32_t)argc, (int64_t)-1,
		     (uint64_t)argc << 40, argv[0], (void *)argv, argc, -2L, 3UL);
	FXKINDS_A_B(argc);
	FXKINDS_X_Y_Z(argv[0]);
	FXKINDS_XLATED(argc, argv[0]);
	FXKINDS_MULTI(argc);
	FXKINDS_MULTI(helper(argc));
	if (FXKINDS_GUARDED_ENABLED())
		FXKINDS_GUARDED(argc);
	FXOTHER_PING(argc);
	return 0;
}
