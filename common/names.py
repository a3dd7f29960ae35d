"""The one name policy, used by the parser, the stash writer and ``verify``.

Provider, module, function and probe names become file and directory names in
the stash (``parsed/$prv:$mod:$fun:$prb``, ``probes/$pid/$prv$pid/$mod/$fun/$prb``)
and are read back by splitting on ``:``.  A name that could escape the state
directory, collide with the separator, or confuse a terminal is *refused*,
never escaped (docs/security.md, "What a hostile client can do").  Limits are
upstream's, counted in bytes of UTF-8, excluding the terminating NUL.
"""

from __future__ import annotations

import re
from typing import Final

from common.dof_abi import (
    DTRACE_ARGTYPELEN,
    DTRACE_FUNCNAMELEN,
    DTRACE_MODNAMELEN,
    DTRACE_NAMELEN,
    DTRACE_PROVNAMELEN,
)

#: Largest name length in bytes (a C buffer of N bytes holds N-1 and a NUL).
MAX_NAME_BYTES: Final = {
    "provider": DTRACE_PROVNAMELEN - 1,
    "module": DTRACE_MODNAMELEN - 1,
    "function": DTRACE_FUNCNAMELEN - 1,
    "probe": DTRACE_NAMELEN - 1,
}
MAX_ARGTYPE_BYTES: Final = DTRACE_ARGTYPELEN - 1
NAME_MAX: Final = 255  # the full "prv:mod:fun:prb" is one file name
#: Longest source-argument string of a ``usdt`` note (``-4@%edi -8@%rsi``), in bytes
#: without its NUL: 255 arguments (nargc is a u8) of up to 16 bytes each
#: (``-8@-1234(%rbp)`` and a separator) fit; dtrace 2.0.7's are under 200 bytes.
MAX_SARGS_BYTES: Final = 4096

_FORBIDDEN_IN_NAME: Final = re.compile(r"[\x00-\x1f\x7f/:]")
_FORBIDDEN_IN_ARGTYPE: Final = re.compile(r"[\x00-\x1f\x7f]")


class NameRefused(ValueError):
    """A name breaks the policy; the message says which name and why."""


def printable(value: str | bytes) -> str:
    """Render a name for a message: control bytes and non-UTF-8 become escapes."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return value.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def check_name(kind: str, value: str) -> None:
    """Refuse *value* as a *kind* name ("provider", "module", "function", "probe")."""
    limit = MAX_NAME_BYTES[kind]
    # Fast path for the common case (every record of every registration comes
    # through here): printable ASCII, where characters are bytes.
    if (
        value.isascii()
        and value.isprintable()
        and 0 < len(value) <= limit
        and "/" not in value
        and ":" not in value
        and value not in (".", "..")
    ):
        return
    if not value:
        raise NameRefused(f"{kind} name is empty")
    if value in (".", ".."):
        raise NameRefused(f'{kind} name "{value}" is not allowed')
    bad = _FORBIDDEN_IN_NAME.search(value)
    if bad is not None:
        raise NameRefused(
            f'{kind} name "{printable(value)}" contains forbidden character {bad.group()!r}'
        )
    size = len(value.encode("utf-8"))
    if size > limit:
        raise NameRefused(f'{kind} name "{printable(value)}" too long: {size} bytes > {limit}')


def probespec(provider: str, module: str, function: str, probe: str) -> str:
    """``prv:mod:fun:prb``: a probe's parsed-file name (names hold no ``:``, so it splits
    back into the four)."""
    return f"{provider}:{module}:{function}:{probe}"


def check_probespec(provider: str, module: str, function: str, probe: str) -> None:
    """Check each component, then that ``prv:mod:fun:prb`` fits one file name."""
    check_name("provider", provider)
    check_name("module", module)
    check_name("function", function)
    check_name("probe", probe)
    size = sum(len(s.encode("utf-8")) for s in (provider, module, function, probe)) + 3
    if size > NAME_MAX:
        raise NameRefused(
            f'probe "{printable(provider)}:{printable(module)}:{printable(function)}:'
            f'{printable(probe)}" too long for a file name: {size} bytes > {NAME_MAX}'
        )


def check_argtype(value: str) -> None:
    """An argument type is not a file name, but it is a C string shown to users."""
    # fast path, as in check_name: printable ASCII, where characters are bytes
    if value.isascii() and value.isprintable() and 0 < len(value) <= MAX_ARGTYPE_BYTES:
        return
    if not value:
        raise NameRefused("argument type is empty")
    bad = _FORBIDDEN_IN_ARGTYPE.search(value)
    if bad is not None:
        raise NameRefused(
            f'argument type "{printable(value)}" contains forbidden character {bad.group()!r}'
        )
    size = len(value.encode("utf-8"))
    if size > MAX_ARGTYPE_BYTES:
        raise NameRefused(
            f'argument type "{printable(value)}" too long: {size} bytes > {MAX_ARGTYPE_BYTES}'
        )


def check_sargs(value: str) -> None:
    """A tracepoint's source-argument string: may be empty; no control characters; bounded."""
    if value.isascii() and value.isprintable() and len(value) <= MAX_SARGS_BYTES:
        return
    bad = _FORBIDDEN_IN_ARGTYPE.search(value)
    if bad is not None:
        raise NameRefused(
            f'argument string "{printable(value)}" contains forbidden character {bad.group()!r}'
        )
    size = len(value.encode("utf-8"))
    if size > MAX_SARGS_BYTES:
        raise NameRefused(
            f'argument string "{printable(value[:64])}..." too long: {size} bytes > {MAX_SARGS_BYTES}'
        )


def decode_name(kind: str, raw: bytes) -> str:
    """Decode a C string from hostile input and apply the policy to it."""
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NameRefused(f'{kind} name "{printable(raw)}" is not valid UTF-8') from None
    if kind == "argtype":
        check_argtype(value)
    elif kind == "sargs":
        check_sargs(value)
    else:
        check_name(kind, value)
    return value
