/*
 * Providers of the fixture fx_kinds: many probe kinds in one object.
 *   noargs                no arguments
 *   many                  10 arguments of assorted native types
 *   a__b, x__y__z         double underscores (D names a-b, x-y-z)
 *   xlated                translated arguments, reordered: args[0] is native arg 1
 *   multi                 three sites, in two functions
 *   guarded               regular and is-enabled sites
 * and a second provider (fxother) in the same object.
 */
provider fxkinds {
	probe noargs();
	probe many(uint8_t, int16_t, uint32_t, int64_t, uint64_t, char *, void *, int, long,
	    unsigned long);
	probe a__b(int);
	probe x__y__z(char *);
	probe xlated(int a, char *b) : (char *b, int a);
	probe multi(int);
	probe guarded(int);
};

provider fxother {
	probe ping(int);
};

/* Distinctive attributes, so the prov note's five attribute words can be told apart. */
#pragma D attributes Evolving/Stable/ISA provider fxother provider
#pragma D attributes Private/Private/Unknown provider fxother module
#pragma D attributes Private/Private/Unknown provider fxother function
#pragma D attributes Stable/Evolving/Common provider fxother name
#pragma D attributes Unstable/Unstable/Cpu provider fxother args
