"""Data: validation errors, splits, batching (the three GD variants), bundled sets, IDX reader."""

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import data


def test_validation_errors_are_clear():
    with pytest.raises(ValueError, match=r"same length.*x \(4, 2\) and y \(3,\)"):
        data.validate(np.ones((4, 2)), np.ones(3))
    x = np.ones((4, 2))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf, first at index \(2, 1\)"):
        data.validate(x, np.ones(4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), found values in \[0, 5\]"):
        data.validate(np.ones((3, 2)), np.array([0, 1, 5]), num_classes=3)
    with pytest.raises(ValueError, match="targets contain NaN"):
        data.validate(np.ones((2, 2)), np.array([0.0, np.inf]))


@pytest.mark.parametrize("batch_size, sizes", [(None, [10]), (1, [1] * 10), (4, [4, 4, 2]), (5, [5, 5])])
def test_batch_indices_cover_every_example_once(batch_size, sizes):
    batches = data.batch_indices(10, batch_size, key=jax.random.PRNGKey(0))
    assert [len(b) for b in batches] == sizes
    assert sorted(np.concatenate([np.asarray(b) for b in batches]).tolist()) == list(range(10))


def test_shuffling_depends_only_on_the_key():
    a = data.batch_indices(50, 50, key=jax.random.PRNGKey(1))[0]
    b = data.batch_indices(50, 50, key=jax.random.PRNGKey(1))[0]
    c = data.batch_indices(50, 50, key=jax.random.PRNGKey(2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(data.batch_indices(5, None)[0], np.arange(5))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.batch_indices(5, 0)


def test_batches_and_split():
    x, y = np.arange(20).reshape(10, 2).astype(np.float32), np.arange(10)
    got = list(data.batches(jnp.asarray(x), jnp.asarray(y), 3))
    assert [len(b[0]) for b in got] == [3, 3, 3, 1]
    np.testing.assert_array_equal(got[0][0][:, 0] // 2, got[0][1])
    x_tr, y_tr, x_te, y_te = data.train_test_split(x, y, 0.3, key=jax.random.PRNGKey(0))
    assert len(x_te) == 3 and len(x_tr) == 7
    assert sorted(np.concatenate([y_tr, y_te]).tolist()) == list(range(10))
    np.testing.assert_array_equal(x_tr[:, 0] // 2, y_tr)
    with pytest.raises(ValueError, match="test_fraction"):
        data.train_test_split(x, y, 1.5, key=jax.random.PRNGKey(0))


def test_bundled_data_sets():
    digits = data.load_digits()
    assert digits.x_train.shape[1] == 64 and len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.max() <= 1.0 and digits.y_train.dtype == np.int32 and digits.info["num_classes"] == 10
    assert data.load_digits(images=True).x_train.shape[1:] == (8, 8, 1)
    cancer = data.load_breast_cancer()
    assert cancer.y_train.shape[1] == 1 and set(np.unique(cancer.y_train)) == {0.0, 1.0}
    np.testing.assert_allclose(cancer.x_train.mean(0), 0, atol=1e-5)
    diabetes = data.load_diabetes()
    np.testing.assert_allclose(diabetes.y_train.std(), 1, rtol=1e-4)
    assert diabetes.info["y_std"] > 0


def test_digits_and_cancer_read_without_sklearn_equal_sklearn_loaders(monkeypatch):
    # fbp reads scikit-learn's bundled files itself (no sklearn import); the reference is
    # scikit-learn's own loader, reached through the fallback
    fast = {"digits": data.load_digits(seed=3, images=True), "cancer": data.load_breast_cancer(seed=2)}
    monkeypatch.setattr(data, "_sklearn_table", lambda *a, **k: None)
    slow = {"digits": data.load_digits(seed=3, images=True), "cancer": data.load_breast_cancer(seed=2)}
    for name in fast:
        for a, b in zip(fast[name][:4], slow[name][:4], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast["cancer"].info["x_std"], slow["cancer"].info["x_std"])


def _write_idx(path, array, type_byte, compress=False):
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def test_read_idx_roundtrip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", images, 0x08)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.idx"), images)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    _write_idx(tmp_path / "b.idx.gz", floats, 0x0D, compress=True)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.idx.gz"), floats)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "junk")
    _write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"promises shape \(4, 4\)"):
        data.read_idx(tmp_path / "short")


def test_load_mnist_from_small_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), 8)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8), 8, True)
    mnist = data.load_mnist(tmp_path)
    assert mnist.x_train.shape == (6, 784) and mnist.x_test.shape == (3, 784) and mnist.x_train.max() <= 1.0
    assert data.load_mnist(tmp_path, flatten=False).x_train.shape == (6, 28, 28, 1)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 11], np.uint8), 8, True)
    with pytest.raises(ValueError, match=r"MNIST test: integer labels must lie in \[0, 10\)"):
        data.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not download"):
        data.load_mnist(tmp_path / "nowhere")
