"""The backward-pass toolkit's cost: a telemetry step and a feedback-alignment step vs a plain step.

Workloads (float32, SGD, softmax cross-entropy):
  * MLP 784-1024-1024-1024-10, ReLU, batch 256 (as bench_mlp.py);
  * CNN 28×28×1, Conv 3×3×32, ReLU, MaxPool 2, Conv 3×3×64, ReLU, MaxPool 2, Dense 128, Dense 10,
    batch 128 (as bench_cnn.py).

Candidates, each one jitted training step on the same params and batch:
  * ``plain``: ``fbp.value_and_grad`` + SGD;
  * ``telemetry``: ``fbp.telemetry.value_grad_and_stats`` + SGD — all nine statistics per leaf
    layer from the same pass (the step returns them);
  * ``flow``: the same with ``stats=telemetry.GRADIENT_FLOW`` (the cotangent, parameter and
    gradient norms — what a gradient-flow plot reads; none of them is a pass over a layer's output);
  * ``FA``: the model with ``fbp.credit.feedback_alignment`` + SGD (``B`` read from the state);
  * ``FA+telemetry``: FA with telemetry, which adds the alignment angle per layer and therefore a
    second, exact backward pass on the same residuals.

Run: ``python benchmarks/bench_toolkit.py [--rounds N] [--runs K]``. Prints medians per run and
the ratio ranges over runs (these machines are noisy: quote ranges).
"""

import argparse

import jax
from common import cnn_workload, interleaved, mlp_workload, sgd

import fbp
from fbp import credit, losses, telemetry

CCE = losses.CategoricalCrossEntropy(from_logits=True)


def steps(model):
    """The four jitted steps, each ``step(params, state, x, y)``."""
    fa = credit.feedback_alignment(model)
    plain_vg = fbp.value_and_grad(model, CCE)
    tele = telemetry.value_grad_and_stats(model, CCE)
    flow = telemetry.value_grad_and_stats(model, CCE, stats=telemetry.GRADIENT_FLOW)
    fa_vg = fbp.value_and_grad(fa, CCE, has_state=True)
    fa_tele = telemetry.value_grad_and_stats(fa, CCE, has_state=True)

    def plain(params, state, x, y):
        value, grads = plain_vg(params, x, y)
        return sgd(params, grads), value

    def with_telemetry(params, state, x, y):
        value, grads, stats = tele(params, x, y)
        return sgd(params, grads), value, stats

    def with_flow(params, state, x, y):
        value, grads, stats = flow(params, x, y)
        return sgd(params, grads), value, stats

    def feedback(params, state, x, y):
        value, grads, _ = fa_vg(params, state, x, y)
        return sgd(params, grads), value

    def feedback_telemetry(params, state, x, y):
        value, grads, _, stats = fa_tele(params, state, x, y)
        return sgd(params, grads), value, stats

    return fa, {"plain": jax.jit(plain), "telemetry": jax.jit(with_telemetry),
                "flow": jax.jit(with_flow), "FA": jax.jit(feedback),
                "FA+telemetry": jax.jit(feedback_telemetry)}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    for name, build in (("MLP", mlp_workload), ("CNN", cnn_workload)):
        model, shape = build()
        kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(kx, shape)
        y = jax.random.randint(ky, (shape[0],), 0, 10)
        params = model.init(kp, x)
        fa, candidates = steps(model)
        state = fa.init_state(params)
        args_ = (params, state, x, y)
        calls = {k: (lambda f=f, a=args_: f(*a)) for k, f in candidates.items()}
        ratios = {k: [] for k in candidates if k != "plain"}
        print(f"\n{name}, batch {shape[0]}  [{jax.devices()[0].platform}]")
        for run in range(args.runs):
            times = interleaved(calls, rounds=args.rounds, reps=args.reps)
            print(f"  run {run + 1}: " + "   ".join(f"{k} {t * 1e3:.2f} ms" for k, t in times.items()))
            for k in ratios:
                ratios[k].append(times[k] / times["plain"])
        for k, values in ratios.items():
            print(f"  ratio {k} / plain: {min(values):.3f} – {max(values):.3f}  (runs: "
                  + ", ".join(f"{v:.3f}" for v in values) + ")")


if __name__ == "__main__":
    main()
