"""Is this folder a slide? Decided by file content, never by extension.

Real exports name DICOM files anything (``1.dcm``, UIDs, no suffix at all), so a file counts
when it has the DICOM preamble magic ``DICM`` at byte 128 and its file meta information names
a slide SOP class. Only the file meta group is parsed (a few hundred bytes, stdlib only): the
client's cohort scanner calls this for every folder without the DICOM libraries installed.
"""

from __future__ import annotations

import struct
from pathlib import Path

#: VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Microscopy Bulk Simple Annotations Storage.
ANN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.91.1"
SLIDE_SOP_CLASSES = (WSI_SOP_CLASS, ANN_SOP_CLASS)
_MAGIC_OFFSET = 128
_META_READ = 4096


def sop_class_of(path: Path) -> str | None:
    """The MediaStorageSOPClassUID of a DICOM Part 10 file, or None if it is not one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_META_READ)
    except OSError:
        return None
    if len(head) < _MAGIC_OFFSET + 4 or head[_MAGIC_OFFSET : _MAGIC_OFFSET + 4] != b"DICM":
        return None
    pos = _MAGIC_OFFSET + 4
    # file meta is always explicit VR little endian; walk its elements up to (0002,0002)
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return None
        vr = head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_at = pos + 8
        if elem == 0x0002:
            return head[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + length
    return None


def dicom_files(folder: Path) -> dict[Path, str]:
    """Every DICOM file directly in folder or below it -> its SOP class UID."""
    folder = Path(folder)
    found: dict[Path, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            sop = sop_class_of(path)
            if sop is not None:
                found[path] = sop
    return found


def is_slide_folder(path: Path) -> bool:
    """True when path is a folder holding at least one VL whole-slide image file (by content).

    A folder of annotation objects alone is not a slide: there would be nothing to tile.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    for p in sorted(path.rglob("*")):
        if p.is_file() and sop_class_of(p) == WSI_SOP_CLASS:
            return True
    return False
