"""Several quantities from one backward pass against one pass per quantity, and against BackPACK.

``fbp.value_and_grad(model, loss, extensions=[...])`` computes the loss, the gradient and every
requested extension in one forward and one backward pass. On the MLP (784-1024-1024-1024-10,
batch 256) and the CNN (28×28×1, batch 128) of bench_mlp.py / bench_cnn.py, float32, each a
jitted call:

  * ``plain``: ``fbp.value_and_grad`` without extensions;
  * ``nvc``: the gradient with GradNorms, Variance and ClippedGrad in one call;
  * ``separate``: the same three from their own entry points, one jitted call each
    (``per_example.grad_norms``, ``per_example.variance``, ``privacy.clipped_grad``);
  * ``floor`` / ``floor plain`` (MLP only): the same quantities and the plain gradient written
    by hand as bare matmuls (``extension_floor.py``): ``floor / floor plain`` is what this CPU
    allows for the three quantities, ``nvc / floor`` what the engine costs beyond it;
  * ``nvc+mc``: ``nvc`` with DiagGGNMC (one sample) in the same call;
  * ``bp``: the gradient with GradNorms, Variance and DiagGGNMC — what BackPACK computes with
    ``BatchL2Grad``, ``Variance`` and ``DiagGGNMC`` in one extended backward (``backpack``,
    PyTorch eager on the same weights and batch: only when torch and BackPACK are installed).

Run: ``python benchmarks/bench_extensions.py [--runs K] [--only mlp,cnn]``: each run's medians
(interleaved rounds in one process) and the range of the ratios over runs.
"""

import argparse

import jax
import jax.numpy as jnp
from common import cnn_workload, mlp_workload, ratio_runs

import fbp
from fbp import curvature, losses, per_example, privacy

CCE = losses.CategoricalCrossEntropy(from_logits=True)
NVC = [per_example.GradNorms(), per_example.Variance(), privacy.ClippedGrad(1.0)]
MC = curvature.DiagGGNMC(1)


def calls(name, model, shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    y = jax.random.randint(jax.random.PRNGKey(1), (shape[0],), 0, 10)
    params = model.init(jax.random.PRNGKey(2), x)
    key = jax.random.PRNGKey(3)
    plain = jax.jit(fbp.value_and_grad(model, CCE))
    nvc = jax.jit(fbp.value_and_grad(model, CCE, extensions=NVC))
    nvc_mc = jax.jit(fbp.value_and_grad(model, CCE, extensions=[*NVC, MC]))
    bp = jax.jit(fbp.value_and_grad(model, CCE, extensions=[per_example.GradNorms(), per_example.Variance(), MC]))
    apart = [jax.jit(f) for f in (per_example.grad_norms(model, CCE), per_example.variance(model, CCE),
                                  privacy.clipped_grad(model, CCE, 1.0))]
    out = {"plain": lambda: plain(params, x, y), "nvc": lambda: nvc(params, x, y),
           "separate": lambda: [f(params, x, y) for f in apart],
           "nvc+mc": lambda: nvc_mc(params, x, y, key=key), "bp": lambda: bp(params, x, y, key=key)}
    if name == "mlp":
        import extension_floor

        floor, floor_plain = jax.jit(extension_floor.norms_variance_clipped), jax.jit(extension_floor.plain)
        out |= {"floor": lambda: floor(params, x, y), "floor plain": lambda: floor_plain(params, x, y)}
    try:
        from extension_peers import backpack_call
    except ImportError as missing:
        print(f"  BackPACK not timed ({missing.name} is not installed)")
        return out, False
    out["backpack"] = backpack_call(name, params, x, y)
    return out, True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="mlp,cnn")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32")
    workloads = {"mlp": mlp_workload, "cnn": cnn_workload}
    for name in args.only.split(","):
        model, shape = workloads[name]()
        print(f"\n{name} {shape}")
        candidates, peer = calls(name, model, shape)
        wanted = ["nvc / plain", "nvc / separate", "separate / plain", "nvc+mc / plain", "bp / plain"]
        if name == "mlp":
            wanted += ["floor / floor plain", "nvc / floor", "plain / floor plain"]
        ratios = ratio_runs(candidates, wanted + (["bp / backpack"] if peer else []), args.runs, args.rounds,
                            reps=3)
        for key, values in ratios.items():
            print(f"  {key}: {min(values):.2f}–{max(values):.2f}")
    return jnp.zeros(())


if __name__ == "__main__":
    main()
