"""A checkpoint's ``.npz`` files: written and read in one pass each, with their SHA-256, no pickle.

``numpy.savez`` streams each member through ``zipfile`` (``tobytes`` copies in 16 MiB chunks,
a CRC-32, seeks back to patch the headers), and the digest then needs the file read back:
``write_npz`` writes the same format — a zip of uncompressed ``.npy`` members that
``numpy.load`` opens — sequentially, each array straight from its memory (``ndarray.tofile``),
its CRC-32 and the file's SHA-256 computed on the way (measured in
``benchmarks/bench_checkpoint.py``).

``numpy.load`` of an ``.npz`` reads each member through ``zipfile`` (a copy and a CRC-32 per
member, then another copy into the array): 1.1 s for a 400 MB member on this project's CPU,
where the file reads in 0.1 s. A checkpoint's file already carries its SHA-256 in the manifest,
so ``read_npz`` reads the whole file once into one buffer, checks the digest on that buffer,
and takes every member as a view of it: the zip's central directory (``zipfile``) gives each
member's offset, the ``.npy`` header (``numpy.lib.format``) its dtype and shape. Members must be
stored uncompressed (as ``numpy.savez`` writes them); an object dtype — the only way a ``.npy``
carries code — is refused, as ``allow_pickle=False`` does.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
import zlib

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip local file header (30 bytes)
_CENTRAL_HEADER = struct.Struct("<4s6H3I5HII")  # a central directory entry (46 bytes)
_END = struct.Struct("<4s4H2IH")  # the end of the central directory (22 bytes)
_END64 = struct.Struct("<4sQ2H2I4Q")  # the zip64 end record (56 bytes)
_LOCATOR64 = struct.Struct("<4sIQI")  # its locator (20 bytes)
_FULL32, _FULL16 = 0xFFFFFFFF, 0xFFFF
ZIP64_AT = _FULL32  # sizes and offsets from here on take zip64 fields (a test lowers it)
_DATE = (0, 33)  # 1980-01-01 00:00: the zip epoch (the files' times are the directory's)


def storable(a: np.ndarray) -> np.ndarray:
    """``a`` as a dtype NumPy writes natively (bfloat16 etc. viewed as same-width unsigned ints;
    the manifest keeps the real dtype).

    Args:
        a: the array.

    Returns:
        ``a`` or a view of it.
    """
    if a.dtype.kind in "biufc" and type(a.dtype).__module__ == "numpy":
        return a
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def write_npz(f, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` to the open binary file ``f`` as an uncompressed ``.npz`` (zip64 where
    a size or offset needs it) and return the SHA-256 of every byte written.

    Args:
        f: a file opened ``"wb"`` at position 0.
        arrays: ``{member: array}`` (plain dtypes; non-contiguous arrays are copied first).

    Returns:
        The hex digest.
    """
    digest, offset, central = hashlib.sha256(), 0, []

    def put(data) -> None:
        nonlocal offset
        f.write(data)
        digest.update(data)
        offset += len(data)

    for name, array in arrays.items():
        array = np.require(array, requirements="C")
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
        head, body = header.getvalue(), array.reshape(-1).view(np.uint8)
        size, crc = len(head) + body.size, zlib.crc32(body, zlib.crc32(head))
        wide = size >= ZIP64_AT or offset >= ZIP64_AT
        file_name = (name + ".npy").encode()
        extra = struct.pack("<2H2Q", 1, 16, size, size) if wide else b""
        short = _FULL32 if wide else size
        start = offset
        put(_LOCAL_HEADER.pack(b"PK\x03\x04", 45 if wide else 20, 0, 0, *_DATE, crc, short, short,
                               len(file_name), len(extra)) + file_name + extra)
        put(head)
        f.flush()
        body.tofile(f)  # straight from the array's memory
        digest.update(body)
        offset += body.size
        central.append((file_name, crc, size, start))
    start, entries = offset, b""
    for file_name, crc, size, at in central:
        wide = size >= ZIP64_AT or at >= ZIP64_AT
        extra = struct.pack("<2H3Q", 1, 24, size, size, at) if wide else b""
        entries += _CENTRAL_HEADER.pack(b"PK\x01\x02", 45 if wide else 20, 45 if wide else 20, 0, 0, *_DATE, crc,
                                        _FULL32 if wide else size, _FULL32 if wide else size, len(file_name),
                                        len(extra), 0, 0, 0, 0, _FULL32 if wide else at) + file_name + extra
    put(entries)
    count = len(central)
    if start >= ZIP64_AT or count >= _FULL16 or len(entries) >= ZIP64_AT:
        end64 = offset
        put(_END64.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(entries), start))
        put(_LOCATOR64.pack(b"PK\x06\x07", 0, end64, 1))
        put(_END.pack(b"PK\x05\x06", 0, 0, _FULL16, _FULL16, _FULL32, _FULL32, 0))
    else:
        put(_END.pack(b"PK\x05\x06", 0, 0, count, count, len(entries), start, 0))
    return digest.hexdigest()


class UnreadableError(ValueError):
    """The file is not a readable ``.npz`` of plain arrays (the message says why)."""


class DigestError(ValueError):
    """The file's SHA-256 is not the one expected: corrupt or truncated."""


def read_npz(path: str, sha256: str | None) -> dict[str, np.ndarray]:
    """``{member: array}`` from an uncompressed ``.npz``, its SHA-256 checked first.

    Args:
        path: the file.
        sha256: its expected hex digest (``None``: not checked).

    Returns:
        The arrays (views of one buffer holding the file).

    Raises:
        DigestError: the digest differs.
        UnreadableError: not a zip of uncompressed ``.npy`` members, or an object array.
    """
    size = os.path.getsize(path)
    buffer = np.empty(size, np.uint8)
    with open(path, "rb") as f:
        if f.readinto(memoryview(buffer)) != size:
            raise DigestError("the file changed while it was read")
    if sha256 is not None and hashlib.sha256(memoryview(buffer)).hexdigest() != sha256:
        raise DigestError("checksum mismatch — the file is corrupt or truncated")
    try:
        with zipfile.ZipFile(path) as z:  # its central directory: each member's offset and size
            infos = z.infolist()
        return {info.filename.removesuffix(".npy"): _member(buffer, info) for info in infos}
    except UnreadableError:
        raise
    except (zipfile.BadZipFile, struct.error, ValueError, OSError) as e:
        raise UnreadableError(f"{type(e).__name__}: {e}") from None


def _member(buffer: np.ndarray, info: zipfile.ZipInfo) -> np.ndarray:
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnreadableError(f"member {info.filename!r} is compressed; checkpoints store arrays uncompressed")
    fields = _LOCAL_HEADER.unpack_from(buffer, info.header_offset)
    if fields[0] != b"PK\x03\x04":
        raise UnreadableError(f"member {info.filename!r}: no local header at its offset")
    start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
    npy = buffer[start:start + info.file_size]
    header = io.BytesIO(npy[:min(len(npy), 1 << 16)].tobytes())
    version = np.lib.format.read_magic(header)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise UnreadableError(f"member {info.filename!r}: .npy format version {version} is not read here")
    shape, fortran, dtype = read(header)
    if dtype.hasobject:
        raise UnreadableError(f"member {info.filename!r} is an object array; refused (it could carry code)")
    count, offset = int(np.prod(shape)), header.tell()
    if offset + count * dtype.itemsize > len(npy):
        raise UnreadableError(f"member {info.filename!r} is shorter than its header says")
    flat = npy[offset:offset + count * dtype.itemsize].view(dtype) if count else np.empty(0, dtype)
    return flat.reshape(shape, order="F" if fortran else "C")
