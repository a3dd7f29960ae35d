"""The ELF64 and ``.note.usdt`` layouts both the notes parser and the test-object builder use.

Little-endian x86_64 only, which is all this daemon serves (``<elf.h>``; the
note types are upstream's ``sys/usdt_note_defs.h``).  No I/O.
"""

from __future__ import annotations

import struct
from typing import Final

EHDR: Final = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
SHDR: Final = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes
NHDR: Final = struct.Struct("<III")  # Elf64_Nhdr: namesz, descsz, type

ELFMAG: Final = b"\x7fELF"
ELFCLASS64: Final = 2
ELFDATA2LSB: Final = 1
EV_CURRENT: Final = 1
ET_EXEC: Final = 2
ET_DYN: Final = 3
EM_X86_64: Final = 62
SHT_PROGBITS: Final = 1
SHT_STRTAB: Final = 3
SHT_NOTE: Final = 7
SHN_UNDEF: Final = 0
SHN_LORESERVE: Final = 0xFF00
SHN_XINDEX: Final = 0xFFFF

#: ``usdt`` note types (a probe site, an is-enabled site) and the ``prov`` note's.
NOTE_PROBE: Final = 1
NOTE_ENABLED: Final = 2
NOTE_PROV: Final = 1

NOTES_SECTION: Final = ".note.usdt"
RODATA_SECTION: Final = ".rodata"
