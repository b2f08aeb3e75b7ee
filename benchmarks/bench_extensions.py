"""Several quantities from one backward pass against one pass per quantity.

``fbp.value_and_grad(model, loss, extensions=[...])`` computes the loss, the gradient and every
requested extension in one forward and one backward pass. The alternative a user had before is
one entry point per quantity, each its own pass. On the MLP (784-1024-1024-1024-10, batch 256)
and the CNN (28×28×1, batch 128) of bench_mlp.py / bench_cnn.py, float32, each a jitted call:

  * ``plain``: ``fbp.value_and_grad`` without extensions;
  * ``engine``: the gradient plus GradNorms, SumGradSquared, Variance and ClippedGrad in one call;
  * ``separate``: the gradient, ``per_example.grad_norms``, ``per_example.sum_grad_squared``,
    ``per_example.variance`` and ``privacy.clipped_grad`` as five jitted calls;
  * ``norms``: the gradient plus GradNorms alone.

Run: ``python benchmarks/bench_extensions.py [--runs K] [--only mlp,cnn]``: each run's medians
(interleaved rounds in one process) and the range of the ratios over runs.
"""

import argparse

import jax
import jax.numpy as jnp
from common import cnn_workload, mlp_workload, ratio_runs

import fbp
from fbp import losses, per_example, privacy

CCE = losses.CategoricalCrossEntropy(from_logits=True)
ALL = [per_example.GradNorms(), per_example.SumGradSquared(), per_example.Variance(), privacy.ClippedGrad(1.0)]


def calls(model, shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    y = jax.random.randint(jax.random.PRNGKey(1), (shape[0],), 0, 10)
    params = model.init(jax.random.PRNGKey(2), x)
    plain = jax.jit(fbp.value_and_grad(model, CCE))
    engine = jax.jit(fbp.value_and_grad(model, CCE, extensions=ALL))
    norms = jax.jit(fbp.value_and_grad(model, CCE, extensions=[per_example.GradNorms()]))
    apart = [jax.jit(f) for f in (per_example.grad_norms(model, CCE), per_example.sum_grad_squared(model, CCE),
                                  per_example.variance(model, CCE), privacy.clipped_grad(model, CCE, 1.0))]
    return {"plain": lambda: plain(params, x, y), "engine": lambda: engine(params, x, y),
            "separate": lambda: [plain(params, x, y)] + [f(params, x, y) for f in apart],
            "norms": lambda: norms(params, x, y)}


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
        ratios = ratio_runs(calls(model, shape), ["engine / separate", "engine / plain", "norms / plain"],
                            args.runs, args.rounds, reps=3)
        for key, values in ratios.items():
            print(f"  {key}: {min(values):.2f}–{max(values):.2f}")
    return jnp.zeros(())


if __name__ == "__main__":
    main()
