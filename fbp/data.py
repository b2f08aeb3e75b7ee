"""Data: validation, splitting, batching, bundled data sets and the MNIST IDX reader.

Nothing here downloads anything. The bundled sets come from scikit-learn (the ``examples``
extra); MNIST is read from IDX files already on the user's disk.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.validation import typed_arguments


class Dataset(NamedTuple):
    """A train/test split; ``info`` carries what a user needs to undo preprocessing."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: dict


# --------------------------------------------------------------------------- validation
@typed_arguments
def validate(x, y, *, num_classes: int | None = None, name: str = "data") -> None:
    """Check a data set before training: matching lengths, finite features, labels in range.

    Runs on concrete arrays (NumPy side), before training, never inside a jitted step.

    Args:
        x: the features, ``(N, ...)``.
        y: the targets, ``N`` of them.
        num_classes: when given, integer labels must lie in ``[0, num_classes)``.
        name: how the data is called in the error (``"validation data"``).

    Raises:
        ValueError: mismatched lengths, NaN or inf (with the first index), or labels out of range.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: features and targets must have the same length along axis 0, "
                         f"got x {x.shape} and y {y.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name}: features contain NaN or inf, first at index {tuple(int(i) for i in bad)}; "
                         f"{int((~np.isfinite(x)).sum())} values in all")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise ValueError(f"{name}: targets contain NaN or inf ({int((~np.isfinite(y)).sum())} values)")
    if num_classes is not None and np.issubdtype(y.dtype, np.integer) and y.size:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name}: integer labels must lie in [0, {num_classes}), found values in [{low}, {high}]")


# --------------------------------------------------------------------------- splitting and batching
@typed_arguments
def train_test_split(x, y, test_fraction: float = 0.2, *, key) -> tuple[np.ndarray, ...]:
    """Shuffle with ``key`` and split: ``(x_train, y_train, x_test, y_test)``.

    Args:
        x: the features.
        y: the targets.
        test_fraction: the share held out, in ``(0, 1)``.
        key: a JAX key for the shuffle.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` as NumPy arrays.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = np.asarray(x), np.asarray(y)
    validate(x, y)
    order = np.asarray(jax.random.permutation(key, x.shape[0]))
    n_test = max(1, int(round(test_fraction * x.shape[0])))
    if n_test >= x.shape[0]:
        raise ValueError(f"holding out {test_fraction} of {x.shape[0]} examples leaves no examples to train on "
                         f"({n_test} held out): use a smaller fraction or more data")
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


@typed_arguments
def batch_indices(n: int, batch_size: int | None, *, key=None) -> list[jax.Array]:
    """Index arrays of the batches of one epoch: shuffled by ``key`` if given.

    ``batch_size=None`` gives one batch of everything (batch gradient descent), ``1`` gives
    single examples (stochastic), ``N`` mini-batches of ``N``; the last batch holds the
    remainder when ``N`` does not divide ``n``.

    Args:
        n: the number of examples.
        batch_size: ``None``, ``1`` or ``N`` (above).
        key: a JAX key to shuffle with; ``None`` keeps the order.

    Returns:
        One index array per batch.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"batch_indices: n must be the number of examples, an int >= 0, got {n!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be >= 1 (an int) or None (the whole data set), got {batch_size!r}")
    size = n if batch_size is None else int(batch_size)
    order = jnp.arange(n) if key is None else jax.random.permutation(key, n)
    return [order[i:i + size] for i in range(0, n, size)]


@typed_arguments
def batches(x, y, batch_size: int | None, *, key=None):
    """Yield ``(x_batch, y_batch)`` for one epoch (see ``batch_indices``).

    Args:
        x: the features.
        y: the targets.
        batch_size: as for ``batch_indices``.
        key: shuffles when given.

    Returns:
        A generator of ``(x_batch, y_batch)``.
    """
    if len(x) != len(y):
        raise ValueError(f"batches: x has {len(x)} examples and y {len(y)}; they must have the same length")
    return _batches(x, y, batch_size, key)


def _batches(x, y, batch_size, key):
    for idx in batch_indices(len(x), batch_size, key=key):
        yield x[idx], y[idx]


# --------------------------------------------------------------------------- bundled data sets
def _sklearn():
    try:
        import sklearn.datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the bundled data sets need scikit-learn: pip install 'fbp[examples]'") from err
    return sklearn.datasets


def _sklearn_table(name: str, skip_header: int = 0) -> np.ndarray | None:
    """The float64 table of one of scikit-learn's bundled CSV files, read without importing
    scikit-learn (a slow import, most of a small script's start-up), or ``None`` where the file
    is not where this version of scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)
    if not os.path.isfile(path):
        return None
    with (gzip.open(path, "rt") if name.endswith(".gz") else open(path)) as f:
        return np.loadtxt(f, delimiter=",", skiprows=skip_header, dtype=np.float64, ndmin=2)


def _standardize(train, test):
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std, mean, std


@typed_arguments
def load_digits(test_fraction: float = 0.2, *, seed: int = 0, images: bool = False) -> Dataset:
    """scikit-learn's 1,797 8×8 handwritten digits, scaled to [0, 1]; labels int32 in [0, 10).

    ``x`` is ``(N, 64)``, or ``(N, 8, 8, 1)`` with ``images=True``.

    Args:
        test_fraction: the share of examples held out for testing.
        seed: the shuffle before the split.
        images: shape ``x`` as images ``(N, 8, 8, 1)``.

    Returns:
        A ``Dataset(x_train, y_train, x_test, y_test, info)``. ``info`` has ``num_classes`` and ``name``.
    """
    table = _sklearn_table("digits.csv.gz")  # what sklearn.datasets.load_digits reads: 64 pixels, then the label
    if table is not None and table.shape == (1797, 65):
        data, target = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - another layout of scikit-learn's files
        bunch = _sklearn().load_digits()
        data, target = bunch.data, bunch.target
    x = (data / 16.0).astype(np.float32)
    if images:
        x = x.reshape(-1, 8, 8, 1)
    y = target.astype(np.int32)
    split = train_test_split(x, y, test_fraction, key=jax.random.PRNGKey(seed))
    return Dataset(*split, {"num_classes": 10, "name": "digits"})


@typed_arguments
def load_breast_cancer(test_fraction: float = 0.2, *, seed: int = 0) -> Dataset:
    """Wisconsin breast cancer, 569 × 30 features standardised with the training statistics;
    targets float32 of shape (N, 1) in {0, 1} (1 = benign).

    Args:
        test_fraction: the share of examples held out for testing.
        seed: the shuffle before the split.

    Returns:
        A ``Dataset(x_train, y_train, x_test, y_test, info)``. ``info`` has the standardisation statistics.
    """
    table = _sklearn_table("breast_cancer.csv", skip_header=1)  # a line of counts and names, then 30 features, label
    if table is not None and table.shape == (569, 31):
        data, target = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # pragma: no cover - another layout of scikit-learn's files
        bunch = _sklearn().load_breast_cancer()
        data, target = bunch.data, bunch.target
    x_tr, y_tr, x_te, y_te = train_test_split(data, target, test_fraction, key=jax.random.PRNGKey(seed))
    x_tr, x_te, mean, std = _standardize(x_tr, x_te)
    as_col = lambda t: t.astype(np.float32).reshape(-1, 1)
    return Dataset(x_tr.astype(np.float32), as_col(y_tr), x_te.astype(np.float32), as_col(y_te),
                   {"num_classes": 2, "name": "breast_cancer", "x_mean": mean, "x_std": std})


@typed_arguments
def load_diabetes(test_fraction: float = 0.2, *, seed: int = 0) -> Dataset:
    """Diabetes regression, 442 × 10; features and the target standardised with the training
    statistics (undo with ``info["y_mean"]``, ``info["y_std"]``); targets of shape (N, 1).

    Args:
        test_fraction: the share of examples held out for testing.
        seed: the shuffle before the split.

    Returns:
        A ``Dataset(x_train, y_train, x_test, y_test, info)``. ``info`` has ``y_mean`` and ``y_std``.
    """
    bunch = _sklearn().load_diabetes()
    x_tr, y_tr, x_te, y_te = train_test_split(bunch.data, bunch.target, test_fraction, key=jax.random.PRNGKey(seed))
    x_tr, x_te, mean, std = _standardize(x_tr, x_te)
    y_tr, y_te, y_mean, y_std = _standardize(y_tr.reshape(-1, 1), y_te.reshape(-1, 1))
    f32 = lambda a: a.astype(np.float32)
    return Dataset(f32(x_tr), f32(y_tr), f32(x_te), f32(y_te),
                   {"name": "diabetes", "x_mean": mean, "x_std": std, "y_mean": float(y_mean[0]),
                    "y_std": float(y_std[0])})


# --------------------------------------------------------------------------- MNIST's IDX format
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``): magic ``0x0000``, a type byte, the number of
    dimensions, the big-endian int32 sizes, then the data in row-major order.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
        The array, of the dtype and shape the header gives.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # truncated or corrupt compressed data
        raise ValueError(f"{path}: corrupt or truncated gzip file ({err}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() if raw else 'missing'})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header promises shape {shape} ({expected} bytes of data), "
                         f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@typed_arguments
def load_mnist(directory: str | os.PathLike, *, flatten: bool = True) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four standard IDX files in ``directory``
    (``train-images-idx3-ubyte[.gz]`` etc.), pixels scaled to [0, 1]. Never downloads.

    Args:
        directory: where the four IDX files are.
        flatten: ``x`` as ``(N, 784)`` (default) or ``(N, 28, 28, 1)``.

    Returns:
        A ``Dataset(x_train, y_train, x_test, y_test, info)``.
    """

    def find(stem):
        for name in (stem, stem + ".gz"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
        raise FileNotFoundError(f"{stem}[.gz] not found in {directory}; fbp does not download data sets")

    def images(stem):
        x = read_idx(find(stem)).astype(np.float32) / 255.0
        return x.reshape(len(x), -1) if flatten else x[..., None]

    x_tr, x_te = images("train-images-idx3-ubyte"), images("t10k-images-idx3-ubyte")
    y_tr = read_idx(find("train-labels-idx1-ubyte")).astype(np.int32)
    y_te = read_idx(find("t10k-labels-idx1-ubyte")).astype(np.int32)
    validate(x_tr, y_tr, num_classes=10, name="MNIST train")
    validate(x_te, y_te, num_classes=10, name="MNIST test")
    return Dataset(x_tr, y_tr, x_te, y_te, {"num_classes": 10, "name": "mnist"})
