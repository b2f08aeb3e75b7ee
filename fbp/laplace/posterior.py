r"""The Laplace approximation of a trained network (MacKay, 1992; Ritter et al., 2018; Daxberger
et al., "Laplace Redux", 2021): around the MAP estimate ``θ*`` the posterior is the Gaussian

.. math::  p(θ \mid D) ≈ N(θ^*, P^{-1}), \qquad P = s\,H + δ I,

``H`` the GGN of the negative log-likelihood summed over the training data (a structure of
``fbp.laplace.structures``), ``s = 1/(σ² T)`` (regression, noise ``σ``) or ``1/T``
(classification), ``T`` a temperature, ``δ`` the prior precision (one number, or one per layer).

**Marginal likelihood** (the evidence, to tune ``δ`` and ``σ``; Immer et al., 2021):

.. math::  \log p(D) ≈ \log p(D \mid θ^*) - \tfrac12 (\log\det P - \log\det δI) - \tfrac12 δ\,‖θ^*‖²,

with ``log p(D|θ*) = −(1/T) Σ_n CE_n`` for classification and
``−(1/(2σ²T)) Σ_n ‖f_n − y_n‖² − (N C/2) log(2πσ²)`` for regression. ``optimize_prior`` maximises
it over ``log δ`` (and ``log σ``) with BFGS; the log-determinants are closed forms of the
structures' eigenvalues, so each evaluation costs no pass over the data.

**Predictive** (``predict``), from the linearised model ``f(x, θ) ≈ f(x, θ*) + J(x)(θ − θ*)``
(``pred_type="glm"``, Immer, Korzepa & Bauer, 2021): the function-space covariance
``Σ_f = J P⁻¹ Jᵀ`` (``J`` from the hand-written backward of one cotangent per output), then

* classification, ``link="probit"``: ``softmax(f / sqrt(1 + π/8 · diag Σ_f))`` (MacKay, 1992);
  ``link="mc"``: the mean of ``softmax(f̃)`` over draws ``f̃ ~ N(f, Σ_f)``;
* regression: the closed form — mean ``f``, variance ``diag Σ_f + σ²``;

or ``pred_type="nn"``: the mean over networks with weights drawn from the posterior.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (jax.scipy.* submodules load on import)
import jax.scipy.optimize  # noqa: F401
import numpy as np
from jax.flatten_util import ravel_pytree

from fbp.core import InputError, run_forward
from fbp.laplace.variances import evaluate, identity_columns, prepare, variances
from fbp.per_example import backward_columns
from fbp.walk import map_leaf_params

LIKELIHOODS = ("classification", "binary", "regression")


def likelihood_of(loss) -> str:
    """The likelihood a loss is the negative log of.

    Args:
        loss: a ``fbp.losses`` loss.

    Returns:
        ``"classification"`` (softmax cross-entropy on logits), ``"binary"`` (sigmoid) or ``"regression"`` (MSE).

    Raises:
        InputError: any other loss (the message names the supported ones).
    """
    found = getattr(loss, "likelihood", None)  # declared by the loss's class (fbp.losses.base.LossBase)
    if found in LIKELIHOODS:
        return found
    raise InputError(repr(loss), "fbp.laplace needs a loss that is a negative log-likelihood: "
                                 "CategoricalCrossEntropy(from_logits=True) (classification), "
                                 "BinaryCrossEntropy(from_logits=True) (binary) or MSE (Gaussian regression)")


def per_column_gradients(model, params, x, columns, state=None):
    """The per-example gradients of output cotangent columns, in inference mode
    (``fbp.per_example.backward_columns``, mode ``"grads"``).

    Args:
        model: the model.
        params: its params.
        x: the inputs.
        columns: ``pred -> (*pred.shape, M)``: the cotangent columns (the loss's Hessian factor,
            or the identity for output Jacobians).
        state: the model state, or ``None``.

    Returns:
        ``(pred, tree)``: the outputs, and a params-shaped tree with leaves ``(M, B, ...)``.
    """
    pred, _, per, _, _ = backward_columns(model, params, x, columns, mode="grads", state=state, train=False)
    m = next(iter(jax.tree_util.tree_leaves(per))).shape[0] if per else 0

    def leaf(path, layer, p):
        return per[path] if path in per else jax.tree_util.tree_map(
            lambda a: jnp.zeros((m, pred.shape[0], *a.shape), a.dtype), p)

    return pred, map_leaf_params(model, params, leaf)


def _chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclasses.dataclass(frozen=True, eq=False)
class Laplace:
    """A Laplace posterior; build it with ``fbp.laplace.fit`` (its Args name these fields).

    It is immutable: ``optimize_prior`` returns a new posterior (``la = la.optimize_prior()``).

    Attributes:
        model: the network.
        loss: its training loss.
        likelihood: ``"classification"``, ``"binary"`` or ``"regression"`` (``likelihood_of``).
        params: the MAP estimate ``θ*``.
        state: the model's state, or ``None``.
        space: the ``fbp.subspace.Subspace`` of the coordinates the posterior covers.
        hessian: ``H``, a structure of ``fbp.laplace.structures``.
        structure: its name (``STRUCTURES``).
        prior_precision: ``δ``, a scalar array or one per layer of ``space.groups``.
        sigma_noise: ``σ`` (regression; 1 otherwise).
        temperature: ``T``.
        n_data: the number of training examples.
        n_outputs: the outputs per example.
        data_term: ``Σ_n CE_n`` (classification) or ``½ Σ_n ‖f_n − y_n‖²`` (regression) at ``θ*``.
        cache: compiled predictive functions, shared by the posteriors ``optimize_prior`` derives.
    """

    model: Any
    loss: Any
    likelihood: str
    params: Any
    state: Any
    space: Any
    hessian: Any
    structure: str
    prior_precision: jax.Array
    sigma_noise: jax.Array
    temperature: float
    n_data: int
    n_outputs: int
    data_term: jax.Array
    cache: dict = dataclasses.field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------------- the posterior
    @property
    def mean(self):
        """``θ*`` on the posterior's coordinates (flat)."""
        return self.space.restrict(self.params)

    def _scale(self, sigma):
        return 1 / (sigma ** 2 * self.temperature) if self.likelihood == "regression" else 1 / self.temperature

    def _delta(self, prior):
        prior = jnp.asarray(prior)
        if prior.ndim == 0:
            return prior
        if prior.shape != (len(self.space.groups),):
            raise ValueError(f"fbp.laplace: prior_precision must be a scalar or one per layer "
                             f"({len(self.space.groups)}: {list(self.space.groups)}), got shape {prior.shape}")
        sizes = [stop - start for start, stop in self.space.groups.values()]
        return jnp.repeat(prior, np.asarray(sizes), total_repeat_length=self.space.dim)

    def log_likelihood(self, sigma_noise=None):
        """``log p(D | θ*)`` (module docstring)."""
        sigma = self.sigma_noise if sigma_noise is None else jnp.asarray(sigma_noise)
        if self.likelihood != "regression":
            return -self.data_term / self.temperature
        normaliser = self.n_data * self.n_outputs * jnp.log(sigma * math.sqrt(2 * math.pi))
        return -self.data_term / (sigma ** 2 * self.temperature) - normaliser

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
        """The Laplace approximation of ``log p(D)`` (module docstring); differentiable in both arguments."""
        prior = self.prior_precision if prior_precision is None else prior_precision
        sigma = self.sigma_noise if sigma_noise is None else jnp.asarray(sigma_noise)
        delta = self._delta(prior)
        theta = self.mean
        prior_logdet = self.space.dim * jnp.log(delta) if jnp.ndim(delta) == 0 else jnp.sum(jnp.log(delta))
        ratio = self.hessian.logdet(self._scale(sigma), delta) - prior_logdet
        return self.log_likelihood(sigma) - 0.5 * (ratio + jnp.sum(delta * theta ** 2))

    def sample(self, key, n: int = 1, *, prior_precision=None, sigma_noise=None):
        """``n`` parameter draws from the posterior: params-shaped, with a leading axis ``n``."""
        prior = self.prior_precision if prior_precision is None else prior_precision
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        s, delta = self._scale(sigma), self._delta(prior)
        draws = jax.vmap(lambda k: self.mean + self.hessian.sample(k, s, delta))(jax.random.split(key, n))
        return jax.vmap(self._with)(draws)

    def _with(self, theta):
        """``params`` with the posterior's coordinates set to ``theta``."""
        if self.space.full:
            return self.space.unravel(theta)
        return self.space.unravel(ravel_pytree(self.params)[0].at[self.space.indices].set(theta))

    # ----------------------------------------------------------------------- tuning the prior
    def optimize_prior(self, method: str = "marglik", *, layerwise: bool = False, sigma: bool = False,
                       x_val=None, y_val=None, grid=None, **predict_options) -> Laplace:
        """A new posterior with the prior precision (and ``σ``) tuned.

        Args:
            method: ``"marglik"`` (maximise ``log_marginal_likelihood`` by BFGS over ``log δ``)
                or ``"nll"`` (the ``δ`` of ``grid`` with the lowest predictive negative
                log-likelihood on ``x_val, y_val``).
            layerwise: one ``δ`` per layer (``"marglik"`` only).
            sigma: also tune ``σ`` (regression, ``"marglik"``).
            x_val: validation inputs (``"nll"``).
            y_val: validation targets (``"nll"``).
            grid: ``δ`` values to try (``"nll"``); default ``logspace(-4, 4, 33)``, then a grid 16
                times finer around the best of those.
            **predict_options: passed to ``predict`` (``"nll"``).
        """
        if method == "marglik":
            return self._marglik(layerwise, sigma)
        if method != "nll":
            raise ValueError(f"fbp.laplace.optimize_prior: method must be 'marglik' or 'nll', got {method!r}")
        if x_val is None or y_val is None:
            raise ValueError("fbp.laplace.optimize_prior(method='nll') needs x_val and y_val")
        refine = grid is None
        grid = np.logspace(-4, 4, 33) if grid is None else np.asarray(grid, dtype=float)
        score = self._nll_scorer(x_val, y_val, **predict_options)
        scores = [score(d) for d in grid]
        best = grid[int(np.nanargmin(scores))]
        if refine:  # a second, 16 times finer grid around the best of the first
            fine = best * np.logspace(-0.25, 0.25, 9)
            fine_scores = [score(d) for d in fine]
            best = fine[int(np.nanargmin(fine_scores))] if min(fine_scores) < min(scores) else best
        return self._replace(prior_precision=jnp.asarray(best, self.mean.dtype))

    def _nll_scorer(self, x_val, y_val, **predict_options):
        """``δ -> validation NLL``; for the linearised probit predictive what the variances
        need is computed once (``_variance_parts``), so each ``δ`` costs one weighing of it."""
        if predict_options.get("pred_type", "glm") != "glm" or predict_options.get("link", "probit") != "probit" \
                or not self.hessian.diagonal_in_eigenbasis(jnp.asarray(1.0)):
            return lambda d: float(self._replace(prior_precision=jnp.asarray(d, self.mean.dtype)).nll(
                x_val, y_val, **predict_options))
        size = predict_options.get("batch_size", 256)
        prepared, weighed = self._variance_parts()
        n = jax.tree_util.tree_leaves(x_val)[0].shape[0]
        parts = [prepared(jax.tree_util.tree_map(lambda a, lo=lo, hi=hi: a[lo:hi], x_val))
                 for lo, hi in _chunks(n, size)]
        f = jnp.concatenate([p[0] for p in parts])

        def score(d):
            var = jnp.concatenate([weighed(p[1], jnp.asarray(d, self.mean.dtype), self.sigma_noise) for p in parts])
            return float(self._nll_of(self._link(f / jnp.sqrt(1 + math.pi / 8 * var)), y_val))

        return score

    def _variance_parts(self):
        """``(prepared, weighed)``, compiled: ``x -> (f(x), parts)`` once, and
        ``(parts, δ, σ) -> diag Σ_f(x)`` for any ``δ, σ`` — ``fbp.laplace.variances``' squares
        for a structure with ``variance_weights``, else the Jacobians rotated into ``H``'s
        eigenbasis and squared, ``diag Σ_f = (Qᵀ J)² · 1/(s λ + δ)``."""

        def build():
            if hasattr(self.hessian, "variance_weights"):
                specs: list = []  # filled when prepared is traced
                return (jax.jit(lambda x: prepare(self.model, self.params, self.state, x, self.hessian, self.space,
                                                  specs)),
                        jax.jit(lambda parts, prior, sigma: evaluate(self.model, parts, specs, self.hessian, self.space,
                                                                     self._scale(sigma), self._delta(prior))))
            return (jax.jit(self._rotated_squares),
                    jax.jit(lambda sq, prior, sigma: sq @ self._eigen_weights(prior, sigma)))

        return self._compiled("variance parts", build)

    def _marglik(self, layerwise: bool, sigma: bool) -> Laplace:
        if sigma and self.likelihood != "regression":
            raise ValueError("fbp.laplace.optimize_prior: sigma=True tunes the noise of a regression likelihood")
        groups = len(self.space.groups) if layerwise else 1
        start = jnp.broadcast_to(jnp.log(jnp.mean(jnp.asarray(self.prior_precision))), (groups,))
        start = jnp.concatenate([start, jnp.log(self.sigma_noise)[None]]) if sigma else start

        def objective(z):
            prior = jnp.exp(z[:groups]) if layerwise else jnp.exp(z[0])
            noise = jnp.exp(z[groups]) if sigma else None
            return -self.log_marginal_likelihood(prior, noise)

        found = jax.jit(lambda z0: jax.scipy.optimize.minimize(objective, z0, method="BFGS", options={"gtol": 1e-9}).x)(
            start.astype(self.mean.dtype))
        prior = jnp.exp(found[:groups]) if layerwise else jnp.exp(found[0])
        noise = jnp.exp(found[groups]) if sigma else self.sigma_noise
        return self._replace(prior_precision=prior, sigma_noise=noise)

    def _replace(self, **changes) -> Laplace:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------- the predictive
    def _compiled(self, name, build):
        if name not in self.cache:
            self.cache[name] = build()
        return self.cache[name]

    def _jacobians(self, x):
        """``(f(x), J)``: the outputs ``(B, C)`` and their Jacobians ``(B, C, dim)`` on the posterior's coordinates."""

        pred, rows = per_column_gradients(self.model, self.params, x, identity_columns, self.state)
        jac = jax.vmap(jax.vmap(self.space.restrict))(rows)  # (C, B, dim)
        return pred, jnp.swapaxes(jac, 0, 1)

    def _covariance(self, x, prior, sigma):
        pred, jac = self._jacobians(x)
        s, delta = self._scale(sigma), self._delta(prior)
        if self.hessian.diagonal_in_eigenbasis(delta):  # J P⁻¹ Jᵀ = Σ_k (Qᵀ J)_k (Qᵀ J)_kᵀ / (s λ_k + δ_k)
            rotated = jax.vmap(jax.vmap(self.hessian.spectral))(jac)
            return pred, jnp.einsum("bcd,d,bkd->bck", rotated, self._eigen_weights(prior, sigma), rotated)
        solved = jax.vmap(jax.vmap(lambda r: self.hessian.solve(r, s, delta)))(jac)
        return pred, jnp.einsum("bcd,bkd->bck", jac, solved)

    def _variances(self, x, prior, sigma):
        """``(f(x), diag Σ_f(x))``, ``(B, C)`` each: what the probit and the regression
        predictives read, without the ``C × C`` covariance (``C`` times fewer products)."""
        s, delta = self._scale(sigma), self._delta(prior)
        if hasattr(self.hessian, "variance_weights"):
            return variances(self.model, self.params, self.state, x, self.hessian, self.space, s, delta)
        if self.hessian.diagonal_in_eigenbasis(delta):  # diag J P⁻¹ Jᵀ = (Qᵀ J)² · 1/(s λ + δ)
            pred, squares = self._rotated_squares(x)
            return pred, squares @ self._eigen_weights(prior, sigma)
        pred, jac = self._jacobians(x)
        solved = jax.vmap(jax.vmap(lambda r: self.hessian.solve(r, s, delta)))(jac)
        return pred, jnp.sum(jac * solved, axis=-1)

    def _rotated_squares(self, x):
        """``(f(x), (Qᵀ J)²)``: the Jacobian rows in ``H``'s eigenbasis, squared, ``(B, C, dim)``."""
        pred, jac = self._jacobians(x)
        return pred, jnp.square(jax.vmap(jax.vmap(self.hessian.spectral))(jac))

    def _eigen_weights(self, prior, sigma):
        """``1/(s λ + δ)`` in ``H``'s eigenbasis (``structures``' ``spectral`` layout)."""
        return 1 / (self._scale(sigma) * self.hessian.eigenvalues() + self._delta(prior))

    def functional_covariance(self, x):
        """``(f(x), Σ_f(x))``: outputs ``(B, C)`` and ``J P⁻¹ Jᵀ``, ``(B, C, C)``."""
        run = self._compiled("covariance", lambda: jax.jit(self._covariance))
        return run(x, self.prior_precision, self.sigma_noise)

    def predict(self, x, *, pred_type: str = "glm", link: str = "probit", samples: int = 100, key=None,
                batch_size: int = 256):
        """The posterior predictive (module docstring), in chunks of ``batch_size`` test points.

        Args:
            x: the test inputs.
            pred_type: ``"glm"`` (the linearised model) or ``"nn"`` (networks drawn from the posterior).
            link: ``"probit"`` or ``"mc"`` (classification with ``"glm"``).
            samples: draws for ``"mc"`` and ``"nn"``.
            key: their key.
            batch_size: test points per compiled chunk.

        Returns:
            Class probabilities ``(B, C)`` (classification), probabilities of the positive class
            shaped like the outputs (binary), or ``(mean, variance)`` (regression).
        """
        if pred_type not in ("glm", "nn"):
            raise ValueError(f"fbp.laplace.predict: pred_type must be 'glm' or 'nn', got {pred_type!r}")
        if link not in ("probit", "mc"):
            raise ValueError(f"fbp.laplace.predict: link must be 'probit' or 'mc', got {link!r}")
        key = jax.random.key(0) if key is None else key
        run = self._compiled(("predict", pred_type, link, int(samples)), lambda: jax.jit(
            lambda xb, k, prior, sigma: self._predict_chunk(xb, pred_type, link, int(samples), k, prior, sigma)))
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        parts = [run(jax.tree_util.tree_map(lambda a, lo=lo, hi=hi: a[lo:hi], x), jax.random.fold_in(key, i),
                     self.prior_precision, self.sigma_noise)
                 for i, (lo, hi) in enumerate(_chunks(n, batch_size))]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)

    def _predict_chunk(self, x, pred_type, link, samples, key, prior, sigma):
        sigma2 = sigma ** 2
        if pred_type == "nn":
            draws = self.sample(key, samples, prior_precision=prior, sigma_noise=sigma)
            outs = jax.lax.map(lambda p: run_forward(self.model, p, x, state=self.state)[0], draws)
            if self.likelihood == "regression":
                return outs.mean(0), outs.var(0) + sigma2
            return self._link(outs).mean(0)
        if self.likelihood == "regression" or link == "probit":  # these read the variances only
            f, var = self._variances(x, prior, sigma)
            if self.likelihood == "regression":
                return f, var + sigma2
            return self._link(f / jnp.sqrt(1 + math.pi / 8 * var))
        f, cov = self._covariance(x, prior, sigma)
        jitter = 1e-10 * jnp.eye(f.shape[-1], dtype=f.dtype)
        chol = jnp.linalg.cholesky(cov + jitter)
        eps = jax.random.normal(key, (samples, *f.shape), f.dtype)
        return self._link(f + jnp.einsum("bck,sbk->sbc", chol, eps)).mean(0)

    def _link(self, f):
        return jax.nn.softmax(f, axis=-1) if self.likelihood == "classification" else jax.nn.sigmoid(f)

    def nll(self, x, y, **predict_options):
        """The mean predictive negative log-likelihood of ``(x, y)`` (integer classes, 0/1
        targets, or real targets: the Gaussian with the predictive variance)."""
        return self._nll_of(self.predict(x, **predict_options), y)

    def _nll_of(self, out, y):
        tiny = 1e-300 if jnp.result_type(self.mean) == jnp.float64 else 1e-30
        if self.likelihood == "regression":
            mean, var = out
            return jnp.mean(0.5 * jnp.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var)
        if self.likelihood == "binary":
            y = jnp.asarray(y).reshape(out.shape)
            return -jnp.mean(y * jnp.log(out + tiny) + (1 - y) * jnp.log(1 - out + tiny))
        y = jnp.asarray(y)
        p = jnp.take_along_axis(out, y[:, None], axis=1)[:, 0] if y.ndim == 1 else jnp.sum(out * y, axis=1)
        return -jnp.mean(jnp.log(p + tiny))


__all__ = ["LIKELIHOODS", "Laplace", "likelihood_of", "per_column_gradients"]
