"""Is this folder a slide? A DICOM slide by file content, a scanner file by its suffix.

Real exports name DICOM files anything (``1.dcm``, UIDs, no suffix at all), so a file counts
when it has the DICOM preamble magic ``DICM`` at byte 128 and its file meta information names
a slide SOP class. Scanner formats are known by suffix (.svs, .ndpi, .mrxs; a .tif/.tiff
only when it is tiled, as pyramidal slides are). Only the file meta group (a few hundred
bytes) or a TIFF's first directory is parsed, stdlib only: the client's cohort scanner calls
this for every folder without the DICOM libraries installed.
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
    """True when path is a folder holding at least one VL whole-slide image file (by content)
    or exactly one scanner-format slide file (``scanner_file``).

    A folder of annotation objects alone is not a slide: there would be nothing to tile.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    if scanner_file(path) is not None:
        return True
    for p in sorted(path.rglob("*")):
        if p.is_file() and sop_class_of(p) == WSI_SOP_CLASS:
            return True
    return False


#: Scanner formats read through OpenSlide (``marrowdx.slides.scanner``), by file suffix:
#: Aperio, Hamamatsu, 3DHISTECH MIRAX (the .mrxs file beside its data folder), and tiled TIFF
#: (generic pyramidal TIFF; a .tif that is not tiled is an ordinary image, not a slide).
SCANNER_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff")
_TIFF_TILE_WIDTH = 322


def is_tiled_tiff(path: Path) -> bool:
    """True when the first image directory of a (Big)TIFF has tiles (a TileWidth tag).

    Parsed with the stdlib (header and first IFD only): pyramidal slide TIFFs are tiled,
    the striped TIFFs a camera or Pillow writes for one field of view are not.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None:
                return False
            (magic,) = struct.unpack_from(order + "H", head, 2)
            if magic == 42:
                (ifd,) = struct.unpack_from(order + "I", head, 4)
                count_fmt, entry_size, tag_fmt = "H", 12, "H"
            elif magic == 43:
                (ifd,) = struct.unpack_from(order + "Q", head, 8)
                count_fmt, entry_size, tag_fmt = "Q", 20, "H"
            else:
                return False
            fh.seek(ifd)
            raw = fh.read(struct.calcsize(count_fmt))
            (count,) = struct.unpack(order + count_fmt, raw)
            entries = fh.read(min(count, 4096) * entry_size)
    except (OSError, struct.error):
        return False
    for i in range(len(entries) // entry_size):
        (tag,) = struct.unpack_from(order + tag_fmt, entries, i * entry_size)
        if tag == _TIFF_TILE_WIDTH:
            return True
    return False


def scanner_file(folder: Path) -> Path | None:
    """The one scanner-format slide file directly in folder, or None.

    A folder holding DICOM slide files is a DICOM slide, not this; two scanner files in one
    patient folder are ambiguous and give None too (the cohort then reports the folder's
    files as unreadable images rather than guessing).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower()
        if not p.is_file() or suffix not in SCANNER_SUFFIXES:
            continue
        if suffix in (".tif", ".tiff") and not is_tiled_tiff(p):
            continue
        found.append(p)
    return found[0] if len(found) == 1 else None
