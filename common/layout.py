"""Fixed-size C structures declared as data.

A :class:`Layout` names a C struct, lists its fields in declaration order with
their :mod:`struct` format codes (padding spelled out as ``Nx``), and states the
kernel's or compiler's ``sizeof``.  The size is checked when the layout is
built, i.e. at import time, so a typo in a field list fails loudly at once.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from typing import Any, Final


class Layout:
    """One C struct: native byte order, no implicit alignment."""

    def __init__(self, cname: str, fields: tuple[tuple[str, str], ...], *, size: int) -> None:
        self.cname: Final = cname
        self.fields: Final = fields
        self.struct: Final = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        if self.struct.size != size:
            raise AssertionError(f"{cname}: layout is {self.struct.size} bytes, sizeof is {size}")
        self.size: Final = size
        names = [name for name, fmt in fields if not fmt.endswith("x")]
        self.tuple: Final[Any] = namedtuple(cname, names)  # type: ignore[misc]
        self._offsets = {}
        off = 0
        for name, fmt in fields:
            if not fmt.endswith("x"):
                self._offsets[name] = off
            off += struct.calcsize("<" + fmt)

    def offset(self, field: str) -> int:
        """Byte offset of *field* within the struct."""
        return self._offsets[field]

    def unpack_from(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> Any:
        """Decode one struct at *offset*; the caller has checked the bounds."""
        return self.tuple._make(self.struct.unpack_from(buf, offset))

    def pack(self, *values: Any) -> bytes:
        return self.struct.pack(*values)


def map_namespace(prefix: str, namespace: dict[str, Any]) -> dict[int, str]:
    """Value → name for every ``int`` constant in *namespace* whose name starts with *prefix*."""
    return {
        value: name
        for name, value in namespace.items()
        if name.startswith(prefix) and isinstance(value, int)
    }
