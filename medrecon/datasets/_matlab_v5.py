"""Structure check of MATLAB v5-v7 ``.mat`` files, run before :func:`scipy.io.loadmat` reads one.

scipy's compiled reader trusts the element tags: a corrupt byte in a tag's type can crash the
process (SIGSEGV) instead of raising.  :func:`check_v5` walks every data element first: a known
type, inside its parent, array flags / dimensions / name in front of each variable, data sizes that
match the dimensions, cells and structs with as many values as their dimensions say; compressed
variables are inflated (bounded).  The layout is the one MathWorks documents in "MAT-File Format"
(level 5 MAT-files).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

__all__ = ["check_v5", "BrokenMatFile"]

#: v5 data types → element size in bytes (0: holds other elements)
_MI_SIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8, 14: 0, 15: 0, 16: 1, 17: 2, 18: 4}
_MI_NUMERIC = (1, 2, 3, 4, 5, 6, 7, 9, 12, 13)
_MX_NUMERIC = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS


class BrokenMatFile(Exception):
    """A v5 file whose structure is broken (turned into InputError)."""


def _elements(buf: bytes, start: int, end: int, order: str) -> list[tuple[int, int, int]]:
    """The data elements in ``buf[start:end]`` as (type, data offset, byte count)."""
    out = []
    pos = start
    while pos < end:
        if end - pos < 8:
            raise BrokenMatFile(f"truncated data element tag at byte {pos}")
        first, second = struct.unpack_from(order + "II", buf, pos)
        if first >> 16:  # small data element: type and size in 4 bytes, data in the next 4
            mtype, n, data, nxt = first & 0xFFFF, first >> 16, pos + 4, pos + 8
            if n > 4:
                raise BrokenMatFile(f"small data element of {n} bytes at byte {pos}")
        else:
            mtype, n, data = first, second, pos + 8
            nxt = data + n if mtype == 15 else data + (n + 7) // 8 * 8
        if mtype not in _MI_SIZE:
            raise BrokenMatFile(f"unknown data type {mtype} at byte {pos}")
        if data + n > end:
            raise BrokenMatFile(f"data element at byte {pos} claims {n} bytes; only {end - data} are left")
        out.append((mtype, data, n))
        pos = min(nxt, end)
    return out


def _check_tags(buf: bytes, start: int, end: int, order: str, depth: int) -> None:
    """Check only that the elements inside ``buf[start:end]`` are well formed, recursively."""
    if depth > 16:
        raise BrokenMatFile("variables nested more than 16 deep")
    for mtype, data, n in _elements(buf, start, end, order):
        if mtype == 14:
            _check_tags(buf, data, data + n, order, depth + 1)


def _check_matrix(buf: bytes, start: int, end: int, order: str, depth: int) -> None:
    """Check one miMATRIX element's structure (flags, dimensions, name, parts) and its children."""
    if depth > 16:
        raise BrokenMatFile("variables nested more than 16 deep")
    subs = _elements(buf, start, end, order)
    if not subs:
        return  # an empty matrix (e.g. an empty cell)
    if subs[0][0] != 6 or subs[0][2] != 8:
        raise BrokenMatFile(f"variable at byte {start} does not start with array flags")
    flags = struct.unpack_from(order + "I", buf, subs[0][1])[0]
    cls, is_complex = flags & 0xFF, bool(flags & 0x800)
    if not 1 <= cls <= 17:
        raise BrokenMatFile(f"unknown MATLAB class {cls} at byte {start}")
    if cls in (16, 17):  # function handles, MATLAB objects: own layouts; check the element tags only
        for mtype, data, n in subs[1:]:
            if mtype == 14:
                _check_tags(buf, data, data + n, order, depth + 1)
        return
    if len(subs) < 3 or subs[1][0] not in (5, 6) or subs[1][2] < 8 or subs[2][0] not in (1, 2, 16):
        raise BrokenMatFile(f"variable header at byte {start} is not array flags, dimensions and name")
    dims = struct.unpack_from(f"{order}{subs[1][2] // 4}i", buf, subs[1][1])
    if min(dims) < 0:
        raise BrokenMatFile(f"negative dimension {dims} at byte {start}")
    count = 1
    for d in dims:
        count *= d
    rest = subs[3:]
    if cls in _MX_NUMERIC or cls == 4:  # numeric or char: real part [+ imaginary part]
        if len(rest) != 1 + (is_complex and cls != 4):
            raise BrokenMatFile(f"numeric variable at byte {start} has {len(rest)} parts")
        for mtype, _, n in rest:
            if mtype not in _MI_NUMERIC + (16, 17, 18) or (cls != 4 and n != count * _MI_SIZE[mtype]):
                raise BrokenMatFile(f"variable at byte {start}: {n} bytes of type {mtype} for dimensions {dims}")
        return
    if cls == 5:  # sparse: row indices, column starts, values [, imaginary values]
        if len(rest) != 3 + is_complex or any(t not in _MI_NUMERIC for t, _, _ in rest):
            raise BrokenMatFile(f"sparse variable at byte {start} is malformed")
        return
    children = rest
    if cls in (2, 3):  # struct / object: [class name,] field-name length, field names, fields
        skip = 3 if cls == 3 else 2
        if len(rest) < skip or rest[skip - 2][0] != 5 or rest[skip - 2][2] != 4:
            raise BrokenMatFile(f"struct at byte {start} has no field-name length")
        width = struct.unpack_from(order + "i", buf, rest[skip - 2][1])[0]
        if width <= 0 or rest[skip - 1][2] % width:
            raise BrokenMatFile(f"struct at byte {start}: field names do not fit their length {width}")
        children = rest[skip:]
        if len(children) != count * (rest[skip - 1][2] // width):
            raise BrokenMatFile(f"struct at byte {start} has {len(children)} values for {dims} × fields")
    elif cls == 1 and len(children) != count:
        raise BrokenMatFile(f"cell at byte {start} has {len(children)} values for dimensions {dims}")
    for mtype, data, n in children:
        if mtype == 14:
            _check_matrix(buf, data, data + n, order, depth + 1)
        elif cls in (1, 2, 3):
            raise BrokenMatFile(f"cell or struct value at byte {data} is not a variable")


def check_v5(p: Path, max_bytes: int) -> None:
    """Check the structure of a v5 (v6/v7) file before scipy reads it.

    scipy's compiled reader trusts element types and sizes; a corrupt byte in a tag can crash
    the process.  Every element is checked here first: a known type, inside its parent, sizes that
    match the dimensions; compressed variables are inflated, at most ``max_bytes`` each.

    Raises
    ------
    BrokenMatFile
        The first problem found, with its byte offset.
    OSError
        The file cannot be read.
    """
    buf = p.read_bytes()
    if len(buf) < 128:
        raise BrokenMatFile("shorter than the 128-byte MATLAB header")
    order = {b"IM": "<", b"MI": ">"}.get(buf[126:128])
    if order is None:
        raise BrokenMatFile(f"endian indicator {buf[126:128]!r} is not 'IM' or 'MI'")
    for mtype, data, n in _elements(buf, 128, len(buf), order):
        if mtype == 15:
            inflate = zlib.decompressobj()
            try:
                inner = inflate.decompress(buf[data:data + n], max_bytes)
            except zlib.error as err:
                raise BrokenMatFile(f"compressed variable at byte {data - 8}: {err}") from err
            if inflate.unconsumed_tail:
                raise BrokenMatFile(f"compressed variable at byte {data - 8} is too large to read on this machine")
            for itype, idata, inn in _elements(inner, 0, len(inner), order):
                if itype != 14:
                    raise BrokenMatFile(f"compressed element at byte {data - 8} holds type {itype}, not a variable")
                _check_matrix(inner, idata, idata + inn, order, 0)
        elif mtype == 14:
            _check_matrix(buf, data, data + n, order, 0)
        else:
            raise BrokenMatFile(f"top-level data element of type {mtype} at byte {data - 8}; expected variables")
