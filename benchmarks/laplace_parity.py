"""fbp.laplace beside laplace-torch on the same trained digits MLP, in float64.

The MLP (64-16-10, tanh) is trained with fbp; its weights are copied into the same
``torch.nn.Sequential``. Both libraries build the Laplace posterior of the same weights on
the same 1,437 training digits (one batch, so that no convention for accumulating K-FAC factors
over batches enters), with the same prior precision δ, and are compared on:

* the log marginal likelihood at δ (``la.log_marginal_likelihood(δ)``);
* the linearised predictive with the probit link on the 360 test digits (``la(x, pred_type="glm",
  link_approx="probit")``);
* the prior precision each library's marginal-likelihood optimiser finds (laplace-torch: Adam
  on ``log δ``, 100 steps by default; fbp: BFGS to convergence) — their optima, not their
  paths, should agree.

Structures: ``diag`` (all weights), ``full`` (all weights; 1,210 parameters), ``last_layer``
(``full`` on the output layer) and ``kron``, twice: fbp's default ``kfac`` treats a layer's
weights and bias as one matrix (``[W; b]``, the bias a last input row of ``A``), so its block
holds the weight-bias cross terms ``ā ⊗ G``; laplace-torch gives the bias a block of its own
(``G``) and drops them — ``kfac-bias`` is fbp with ``separate_bias=True``, the same convention.

Needs ``torch`` and ``laplace-torch`` (``pip install laplace-torch``; uninstall a CUDA-only
torchvision, which breaks ``import laplace`` on a CPU torch). Skipped with a message otherwise.

Run: ``python benchmarks/laplace_parity.py``.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from fbp import data, laplace, losses, nn, optim, train  # noqa: E402

DELTA = 2.0


def main():
    try:
        import torch
        from laplace import Laplace
    except Exception as err:  # noqa: BLE001 - any import failure means: not installed here
        print(f"laplace-torch is not available ({type(err).__name__}: {err}); skipped")
        return 0
    torch.set_default_dtype(torch.float64)
    ds = data.load_digits(seed=0)
    x, y = jnp.asarray(ds.x_train, jnp.float64), jnp.asarray(ds.y_train)
    xt = jnp.asarray(ds.x_test, jnp.float64)
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    model = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(10))
    params = model.init(jax.random.PRNGKey(0), x[:1])
    params = train.fit(model, loss, optim.adam(1e-2), params, x, y, key=jax.random.PRNGKey(1), epochs=40,
                       batch_size=128, progress=False, scan_epochs=True).params
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    with torch.no_grad():
        for layer, p in ((net[0], params[0]), (net[2], params[2])):
            layer.weight.copy_(torch.tensor(np.asarray(p["w"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(p["b"])))
    tx, ty = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tx, ty), batch_size=len(ty))
    print(f"{'structure':11} {'log ML fbp':>12} {'laplace-torch':>14} {'rel. diff':>10} {'max |Δp|':>10} "
          f"{'δ* fbp':>8} {'δ* laplace-torch':>16}")
    for ours, theirs, subset in (("diag", "diag", "all"), ("full", "full", "all"), ("last_layer", "full", "last_layer"),
                                 ("kfac", "kron", "all"), ("kfac-bias", "kron", "all")):
        la_t = Laplace(net, "classification", subset_of_weights=subset, hessian_structure=theirs,
                       prior_precision=DELTA)
        la_t.fit(loader)
        ml_t = float(la_t.log_marginal_likelihood(torch.tensor(DELTA)))
        probs_t = la_t(torch.tensor(np.asarray(xt)), pred_type="glm", link_approx="probit").detach().numpy()
        la_t.optimize_prior_precision(method="marglik", n_steps=300, lr=0.1)
        delta_t = float(la_t.prior_precision)
        la = laplace.fit(model, loss, params, x, y, structure=ours.split("-")[0], prior_precision=DELTA,
                         batch_size=len(y), separate_bias=ours == "kfac-bias")
        ml = float(la.log_marginal_likelihood())
        probs = np.asarray(la.predict(xt))
        delta = float(la.optimize_prior().prior_precision)
        print(f"{ours:11} {ml:12.6f} {ml_t:14.6f} {abs(ml - ml_t) / abs(ml_t):10.2e} "
              f"{np.abs(probs - probs_t).max():10.2e} {delta:8.4f} {delta_t:16.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
