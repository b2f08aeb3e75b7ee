"""``fbp.checkpoint_io``: the ``.npz`` it writes is the format ``numpy.load`` reads, its digest
is the file's, and ``read_npz`` gives back the arrays or refuses."""

import hashlib
import zipfile

import numpy as np
import pytest

from fbp import checkpoint_io

ARRAYS = {"a0": np.arange(12, dtype=np.float32).reshape(3, 4),
          "a1": np.asfortranarray(np.arange(6.0).reshape(2, 3)),  # written in C order
          "a2": np.array(3, np.int64),  # 0-d
          "a3": np.zeros((0, 5), np.uint16),  # empty
          "a4": np.array([True, False]),
          "a5": np.arange(10, dtype=np.float64)[::2]}  # not contiguous


def _write(path, arrays=ARRAYS):
    with open(path, "wb") as f:
        return checkpoint_io.write_npz(f, arrays)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("zip64", [False, True])
def test_numpy_reads_what_it_writes_and_the_digest_is_the_files(tmp_path, monkeypatch, zip64):
    if zip64:  # every member and the directory with zip64 fields (as past 4 GiB)
        monkeypatch.setattr(checkpoint_io, "ZIP64_AT", 0)
    path = tmp_path / "x.npz"
    digest = _write(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert zipfile.ZipFile(path).testzip() is None  # every CRC-32 right
    with np.load(path, allow_pickle=False) as z:
        for name, a in ARRAYS.items():
            _same(z[name], a)
    back = checkpoint_io.read_npz(str(path), digest)
    assert set(back) == set(ARRAYS)
    for name, a in ARRAYS.items():
        _same(back[name], a)


def test_it_reads_what_numpy_writes(tmp_path):
    path = tmp_path / "np.npz"
    np.savez(path, **ARRAYS)
    back = checkpoint_io.read_npz(str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    for name, a in ARRAYS.items():
        _same(back[name], a)


def test_a_wrong_digest_a_compressed_member_or_an_object_array_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    digest = _write(path)
    with pytest.raises(checkpoint_io.DigestError, match="checksum mismatch"):
        checkpoint_io.read_npz(str(path), "0" * 64)
    path.write_bytes(path.read_bytes()[:-30])  # truncated: no end record
    with pytest.raises(checkpoint_io.UnreadableError):
        checkpoint_io.read_npz(str(path), None)
    np.savez_compressed(tmp_path / "c.npz", a=np.ones(3))
    with pytest.raises(checkpoint_io.UnreadableError, match="compressed"):
        checkpoint_io.read_npz(str(tmp_path / "c.npz"), None)
    with zipfile.ZipFile(tmp_path / "o.npz", "w") as z, z.open("a.npy", "w") as f:
        np.lib.format.write_array(f, np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(checkpoint_io.UnreadableError, match="object array"):
        checkpoint_io.read_npz(str(tmp_path / "o.npz"), None)
    assert digest
