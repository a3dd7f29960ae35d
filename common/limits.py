"""Resource limits on one DOF, applied by the parser (and re-checked by the host).

Upstream has none beyond the 256 MiB size cap; a hostile DOF of 10^6 probes
would otherwise tie up the parser and fill the stash.  The defaults admit a
20000-probe DOF with room to spare; all are settable with ``dtprobed``
options and reach the parser child on its command line, before it locks itself.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from common.dof_abi import DOF_MAXSZ

DEFAULT_MAX_DOF_SIZE: Final = DOF_MAXSZ
DEFAULT_MAX_PROVIDERS: Final = 256
DEFAULT_MAX_PROBES: Final = 65536
DEFAULT_MAX_TRACEPOINTS: Final = 262144

Positive = Annotated[int, msgspec.Meta(ge=1)]


class ParseLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-DOF limits; exceeding one is an ``E2BIG`` error naming the limit."""

    max_dof_size: Annotated[int, msgspec.Meta(ge=64, le=DOF_MAXSZ)] = DEFAULT_MAX_DOF_SIZE
    max_providers: Positive = DEFAULT_MAX_PROVIDERS
    max_probes: Positive = DEFAULT_MAX_PROBES
    max_tracepoints: Positive = DEFAULT_MAX_TRACEPOINTS
