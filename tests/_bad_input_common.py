"""What the hardening tests share: a small classification problem, an MLP, and a ``fit`` that
counts whether training started."""

import jax
import jax.numpy as jnp
import numpy as np

from fbp import losses, nn, optim, train

KEY = jax.random.PRNGKey(0)
MLP = nn.Serial(nn.Dense(8), nn.ReLU(), nn.Dense(3))
CCE = losses.CategoricalCrossEntropy(from_logits=True)
BN_MODEL = nn.Serial(nn.Dense(4), nn.BatchNorm(), nn.ReLU(), nn.Dense(2))


def _blobs(n=40, classes=3):
    x = jax.random.normal(KEY, (n, 2))
    y = jnp.arange(n) % classes
    return x + jax.nn.one_hot(y, 2 if classes <= 2 else classes)[:, :2] * 2, y


X, Y = _blobs()
PARAMS = MLP.init(KEY, X)


class CountingOptimizer:
    """sgd whose ``init`` counts its calls: ``fit`` calls it only once every check has passed,
    so ``calls == 0`` after a raise means the error came before any training."""

    def __init__(self, lr=0.1):
        self.calls, self.inner = 0, optim.sgd(lr)

    def __call__(self):
        def init(params):
            self.calls += 1
            return self.inner.init(params)

        return optim.GradientTransformation(init, self.inner.update)


def _fit(model=MLP, loss=CCE, params=PARAMS, x=X, y=Y, opt=None, **kw):
    kw.setdefault("key", jax.random.PRNGKey(1))
    kw.setdefault("progress", False)
    return train.fit(model, loss, opt if opt is not None else optim.sgd(0.1), params, x, y, **kw)


def _leaves_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def _same(a, b):
    return all(np.array_equal(p, q) for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                                                    strict=True))
