"""Commands the daemon sends to the stash writer child, and its replies.

One command is one frame (:mod:`common.framing`) on the writer's stdin; the
writer answers each with exactly one reply frame on its stdout, in order,
possibly preceded by a bounded number of :class:`Log` frames (its log lines,
which the daemon writes to its own log) and by :class:`Progress` frames (a
long command is working, not hung: the daemon restarts its silence window on
each).  A new writer sends :class:`Started` once, after its start-up recovery
and index rebuild (which send Progress frames too), before it reads a command.
Every type is a frozen, ``array_like``, ``forbid_unknown_fields`` msgspec
Struct with an integer tag as item 0; tags are never reused.  The writer
treats every command as hostile: schema bounds here, then the record grammar
(:mod:`common.grammar`), the name policy and its quotas before any write.

Probe data travels as the record stream the parser produced (``PROVIDER,
PROBE, …, EOF``), not as pre-grouped probes, so the writer re-checks exactly
what the parser's host checked.  See ``docs/protocol.md``, "Stash writer
protocol".
"""

from __future__ import annotations

import argparse
import re
from typing import Annotated, Final

import msgspec

from common.argtypes import positive_int
from common.dof_abi import DOF_HELPER, DOF_MAXSZ
from common.records import ResultRecord

U64 = Annotated[int, msgspec.Meta(ge=0)]
Pid = Annotated[int, msgspec.Meta(ge=1, le=(1 << 22))]  # PID_MAX_LIMIT is 4194304
Gen = Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)]
Helper = Annotated[bytes, msgspec.Meta(min_length=DOF_HELPER.size, max_length=DOF_HELPER.size)]
Dof = Annotated[bytes, msgspec.Meta(min_length=1, max_length=DOF_MAXSZ)]
ExecToken = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[0-9A-Za-z_.:-]*$")]
Message = Annotated[str, msgspec.Meta(max_length=4096)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]

#: Most records one command may carry (one PROVIDER/PROBE/ARGS/TRACEPOINT each).
MAX_RECORDS: Final = 1 << 22
Records = Annotated[list[ResultRecord], msgspec.Meta(max_length=MAX_RECORDS)]

#: Largest command frame: a whole DOF, its records, and msgpack overhead.
MAX_COMMAND_FRAME: Final = DOF_MAXSZ + (64 << 20)
#: DOF bytes one reparse-scan reply carries before it stops (one item always fits).
REPLY_BUDGET: Final = 32 << 20
#: Largest reply frame (a reparse scan carries raw DOF back).
MAX_REPLY_FRAME: Final = DOF_MAXSZ + REPLY_BUDGET + (1 << 20)

#: Log lines the writer sends per command (and at start-up); then one "suppressed" note.
MAX_LOG_RECORDS: Final = 48
#: Longest log line (code points) in a ``Log`` frame; longer ones are cut.
MAX_LOG_MESSAGE: Final = 1000

#: The priority channel (docs/protocol.md): a Register of at most this many records, or
#: a Remove or RemovePid of a process with at most PRIORITY_MAX_PROBES probes, may run
#: between two slices of a long Register, Remove or RemovePid of another process.
PRIORITY_MAX_RECORDS: Final = 1024
PRIORITY_MAX_PROBES: Final = 256
#: Largest frame on the priority channel (a small Register: records, raw DOF, helper).
MAX_PRIORITY_FRAME: Final = 1 << 20

DEFAULT_MAX_GENERATIONS: Final = 1024
DEFAULT_MAX_PROBES_PER_PID: Final = 65536
#: A quarter of the total: one user's processes can't fill the stash for everyone.
DEFAULT_MAX_PROBES_PER_UID: Final = 1 << 18
DEFAULT_MAX_PROBES_TOTAL: Final = 1 << 20
#: Raw bytes (DOF, or notes + .rodata) in the stash: what packaging/install.sh's
#: tmpfs reserves for them beside the probe files (docs/operations.md), so EDQUOT
#: comes before ENOSPC; one user (and one process) gets a quarter.
DEFAULT_MAX_RAW_BYTES_TOTAL: Final = 256 << 20
DEFAULT_MAX_RAW_BYTES_PER_UID: Final = 64 << 20
DEFAULT_MAX_RAW_BYTES_PER_PID: Final = 64 << 20

#: The uid of a registration whose caller's uid is not known (an upstream-written
#: ``dof-pid/$pid`` without the ``trusted.dtprobed.uid`` xattr): ``(uid_t) -1``,
#: never a real uid; all such processes share one per-uid quota.
UNKNOWN_UID: Final = 0xFFFFFFFF
Uid = Annotated[int, msgspec.Meta(ge=0, le=UNKNOWN_UID)]
ByteCount = Annotated[int, msgspec.Meta(ge=1, le=1 << 48)]


class _Msg(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    pass


class StashQuotas(_Msg, frozen=True):
    """Caps that keep one process (or all of them) from filling the stash.

    Exceeding one fails the registration with ``EDQUOT`` and writes nothing.
    Probes and raw bytes are counted per process, per uid (the caller's real
    uid, :attr:`Registration.uid`) and in total; raw bytes are the blocks'
    data, charged to every process that registers them (shared or not).
    """

    max_generations: Count = DEFAULT_MAX_GENERATIONS  # live generations per process
    max_probes_per_pid: Count = DEFAULT_MAX_PROBES_PER_PID
    max_probes_total: Count = DEFAULT_MAX_PROBES_TOTAL
    max_probes_per_uid: Count = DEFAULT_MAX_PROBES_PER_UID
    max_raw_bytes_per_pid: ByteCount = DEFAULT_MAX_RAW_BYTES_PER_PID
    max_raw_bytes_per_uid: ByteCount = DEFAULT_MAX_RAW_BYTES_PER_UID
    max_raw_bytes_total: ByteCount = DEFAULT_MAX_RAW_BYTES_TOTAL


#: The command-line option of each quota (daemon and writer alike): ``--max-probes-per-pid``.
QUOTA_OPTIONS: Final = tuple(
    ("--" + name.replace("_", "-"), name) for name in StashQuotas.__struct_fields__
)


def add_quota_arguments(group: argparse._ActionsContainer) -> None:
    """One option per quota, default the quota's default (``--max-generations N`` …)."""
    defaults = StashQuotas()
    for option, name in QUOTA_OPTIONS:
        metavar = "BYTES" if "bytes" in name else "N"
        group.add_argument(
            option, type=positive_int, default=getattr(defaults, name), metavar=metavar
        )


def quotas_from_args(args: argparse.Namespace) -> StashQuotas:
    """The quotas the options gave; ``ValueError`` past the schema's bounds (e.g. 2^24 probes)."""
    try:
        # array_like: the fields in order; convert (unlike __init__) checks the bounds
        return msgspec.convert([getattr(args, name) for _, name in QUOTA_OPTIONS], StashQuotas)
    except msgspec.ValidationError as err:
        text = str(err)
        where = re.search(r"at `\$\[(\d+)\]`", text)
        if where is not None:  # name the option, not the array index
            option = QUOTA_OPTIONS[int(where.group(1))][0]
            text = f"{option}: {text[: where.start()].rstrip(' -')}"
        raise ValueError(text) from None


def quota_argv(quotas: StashQuotas) -> list[str]:
    """The options that give a writer process *quotas*."""
    return [f"{option}={getattr(quotas, name)}" for option, name in QUOTA_OPTIONS]


class RawBlock(_Msg, frozen=True):
    """One raw block as upstream's raw files hold it: ``u64 base``, then the bytes.

    A DOF registration has one block, ``{0, DOF}``; a ``.note.usdt``
    registration two: ``{sh_addr(.note.usdt), the whole section}`` and
    ``{sh_addr(.rodata), the whole section}`` (files ``raw`` and ``raw-1``).
    """

    base: U64
    data: Dof


RawBlocks = Annotated[list[RawBlock], msgspec.Meta(min_length=1, max_length=2)]


class Registration(_Msg, frozen=True):
    """One ADDDOF as the receiver identified it.

    ``start_time`` is field 22 of ``/proc/PID/stat`` (clock ticks); ``dev`` is
    already in glibc ``makedev`` encoding; ``dev == 0`` with ``ino ==
    dofhp_dof`` means DOF in anonymous memory (never shared).  ``exec_token``
    changes when the process execs, even into the same binary (a heuristic:
    e.g. the AT_RANDOM address; empty when unknown).  ``uid`` is the caller's
    real uid (per-uid quotas; kept as the ``trusted.dtprobed.uid`` xattr).
    ``caught_up``: registered by catch-up on the process's behalf (docs/stash.md,
    "Catch-up"): a new process directory starts at generation 1, the generation
    is listed in ``trusted.dtprobed.caught_up``, an object the process already
    has is not registered again (its generation is answered), and a later live
    registration of the same object replaces the caught-up generation.
    """

    pid: Pid
    start_time: U64
    dev: U64
    ino: U64
    exec_dev: U64
    exec_ino: U64
    exec_token: ExecToken
    helper: Helper
    raw: RawBlocks
    uid: Uid = UNKNOWN_UID
    caught_up: bool = False

    @property
    def raw_bytes(self) -> int:
        """What the raw-bytes quotas charge for this registration."""
        return sum(len(block.data) for block in self.raw)

    @property
    def notes(self) -> bool:
        """A ``.note.usdt`` registration (two blocks), not DOF."""
        return len(self.raw) == 2


class ReparseItem(_Msg, frozen=True):
    """One mapping whose parsed files must be (re)written.

    ``dir_ino`` is the inode of ``dof-pid/$pid/$dev-$ino`` when scanned: the
    writer refuses (``ESTALE``) to write results into a directory that was
    replaced since.  ``raw`` are its raw blocks (one: DOF; two: notes and
    .rodata); a raw file from an older daemon has no base prefix, which
    ``legacy_raw`` then says (its one block has base 0).
    """

    pid: Pid
    dev: U64
    ino: U64
    dir_ino: U64
    helper: Helper
    raw: RawBlocks
    legacy_raw: bool = False

    @property
    def notes(self) -> bool:
        return len(self.raw) == 2


class Command(
    msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True, tag_field="op"
):
    """Base of the writer's commands; on the wire the tag is item 0."""


class Register(Command, tag=1, frozen=True):
    """add + write-parsed, all or nothing; replies :class:`Generation`."""

    reg: Registration
    records: Records


class Remove(Command, tag=2, frozen=True):
    """DTRACEHIOC_REMOVE: an unknown generation is not an error; replies :class:`Removed`."""

    pid: Pid
    gen: Gen


class RemovePid(Command, tag=3, frozen=True):
    """Every generation of a process; replies :class:`Done`, or :class:`Deferred` if
    *may_defer* and a registration asked for the writer (:class:`Yield`) meanwhile."""

    pid: Pid
    may_defer: bool = False


class PruneDead(Command, tag=4, frozen=True):
    """Replies :class:`Pids` with the processes pruned."""


class ReparseScan(Command, tag=5, frozen=True):
    """Replies :class:`Items`: outdated or missing ``parsed/version`` (or all when forced).

    The candidates are sorted by (pid, dev, ino); one reply holds those from
    index ``offset`` on that fit :data:`REPLY_BUDGET` bytes of DOF (at least
    one), and ``Items.next_offset`` says where to continue (None: finished).
    """

    force: bool
    offset: Annotated[int, msgspec.Meta(ge=0, le=1 << 22)] = 0


class WriteReparsed(Command, tag=6, frozen=True):
    """``records`` None: the reparse failed; the mapping is left without parsed files."""

    item: ReparseItem
    records: Records | None


class Verify(Command, tag=7, frozen=True):
    """Replies :class:`Problems` (empty = consistent)."""


class Yield(Command, tag=8, frozen=True):
    """Priority channel only: a registration waits for the main pipe.  A ``RemovePid``
    with ``may_defer`` in progress there stops at its next yield point and replies
    :class:`Deferred`; anything else goes on.  Replies :class:`Done` at once."""


StashCommand = (
    Register | Remove | RemovePid | PruneDead | ReparseScan | WriteReparsed | Verify | Yield
)


class Reply(
    msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True, tag_field="kind"
):
    """Base of the writer's replies."""


class Generation(Reply, tag=1, frozen=True):
    gen: Gen


class Done(Reply, tag=2, frozen=True):
    pass


class Pids(Reply, tag=3, frozen=True):
    pids: Annotated[list[Pid], msgspec.Meta(max_length=1 << 22)]


class Items(Reply, tag=4, frozen=True):
    items: Annotated[list[ReparseItem], msgspec.Meta(max_length=1 << 20)]
    next_offset: Annotated[int, msgspec.Meta(ge=0, le=1 << 22)] | None = None


class Problems(Reply, tag=5, frozen=True):
    problems: Annotated[list[Message], msgspec.Meta(max_length=1 << 16)]


class Failure(Reply, tag=6, frozen=True):
    """The command failed; nothing it would have written is left behind."""

    errno: Annotated[int, msgspec.Meta(ge=1, le=4095)]
    message: Message


class Removed(Reply, tag=8, frozen=True):
    """The answer to :class:`Remove`: whether that generation existed (and is gone now)."""

    existed: bool


class Log(Reply, tag=7, frozen=True):
    """One log line of the writer, for the daemon's log; any number (bounded) may
    precede a reply, and those of start-up recovery precede the first reply.

    ``level`` is a :mod:`logging` level (DEBUG lines only with ``--debug``).
    At most :data:`MAX_LOG_RECORDS` lines (+ one "suppressed" note) per command,
    and as many again at start-up; more is a protocol violation.
    """

    level: Annotated[int, msgspec.Meta(ge=1, le=50)]
    message: Annotated[str, msgspec.Meta(max_length=MAX_LOG_MESSAGE)]


class Progress(Reply, tag=9, frozen=True):
    """Not a reply: the writer is working on a long command (or its start-up).

    Sent at most every ``--progress-interval`` seconds while work advances
    (probes written or removed, processes recovered or indexed; ``done`` counts
    those units since the command began), any number before a reply.  The host
    restarts its silence window (``-t``) on each; the whole command is bounded
    by the host's backstop instead.  A writer that is stuck sends none.
    """

    done: U64
    what: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Started(Reply, tag=10, frozen=True):
    """Sent once by a new writer, after start-up recovery and the index rebuild,
    before it reads its first command: the host waits for it (silence bounded
    by ``-t``, progress keeps it waiting) before sending one."""

    pids: Annotated[int, msgspec.Meta(ge=0)]
    probes: Annotated[int, msgspec.Meta(ge=0)]
    raw_bytes: Annotated[int, msgspec.Meta(ge=0)]


class Busy(Reply, tag=11, frozen=True):
    """Only on the priority channel: the command may not run between the slices of the
    long command in progress (same process or mapping, or too large); nothing was done,
    and the host sends it again on the main channel."""


class Deferred(Reply, tag=12, frozen=True):
    """To a ``RemovePid`` with ``may_defer``: its generations are gone (no consumer sees
    the process any more), not all of its files; the host sends it again, without
    ``may_defer``, once the registration that asked (:class:`Yield`) has the writer."""


StashReply = (
    Generation
    | Done
    | Pids
    | Items
    | Problems
    | Failure
    | Log
    | Removed
    | Progress
    | Started
    | Busy
    | Deferred
)
