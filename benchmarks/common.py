"""Shared timing harness: interleaved rounds in one process, medians and ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def block(tree):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 15, reps: int = 10) -> dict[str, float]:
    """Median seconds per call of each candidate; every round runs all candidates, in rotating order."""
    for fn in candidates.values():  # compile and warm up
        block(fn())
        block(fn())
    samples = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = candidates[name]
            start = time.perf_counter()
            for _ in range(reps):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(s) for name, s in samples.items()}


def ratio_runs(calls: dict[str, Callable[[], object]], ratios: list[str], runs: int, rounds: int,
               reps: int) -> dict[str, list[float]]:
    """``runs`` rounds of :func:`interleaved`, printing each run's medians; returns, for every
    ``"a / b"`` in ``ratios``, the list of per-run ratios of the medians."""
    out: dict[str, list[float]] = {key: [] for key in ratios}
    for run in range(runs):
        t = interleaved(calls, rounds=rounds, reps=reps)
        print(f"  run {run + 1}: " + "   ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()))
        for key in ratios:
            a, b = key.split(" / ")
            out[key].append(t[a] / t[b])
    return out


def temp_bytes(jitted, *args) -> int | None:
    """XLA's compiled temporary-buffer size for ``jitted(*args)``, if the backend reports it."""
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements memory_analysis
        return None


def report(title: str, times: dict[str, float], memory: dict[str, int | None], baseline: str) -> None:
    print(f"\n{title}  [{jax.devices()[0].platform}: {jax.devices()[0].device_kind}]")
    for name, t in times.items():
        mem = memory.get(name)
        mem_text = f"{mem / 2**20:8.1f} MiB temp" if mem is not None else "   n/a temp"
        print(f"  {name:<28} median {t * 1e3:8.2f} ms/step   {mem_text}")
    for name, t in times.items():
        if name != baseline:
            ratio_mem = (memory[name] / memory[baseline]) if memory.get(name) and memory.get(baseline) else float("nan")
            print(f"  ratio {name} / {baseline}: time {t / times[baseline]:.3f}   temp memory {ratio_mem:.3f}")


# --------------------------------------------------------------------------- shared workloads
def mlp_workload():
    """bench_mlp.py's MLP 784-1024-1024-1024-10 (ReLU, He init) and its batch shape (256, 784)."""
    from fbp import nn

    layers = []
    for width in (1024, 1024, 1024):
        layers += [nn.Dense(width, kernel_init=nn.init.he_normal), nn.ReLU()]
    return nn.Serial(*layers, nn.Dense(10)), (256, 784)


def cnn_workload():
    """bench_cnn.py's CNN on flat 28×28×1 input (reshaped first) and its batch shape (128, 784)."""
    from fbp import nn

    return nn.Serial(nn.Reshape((28, 28, 1)), nn.Conv2D(32, 3), nn.ReLU(), nn.MaxPool2D(2), nn.Conv2D(64, 3),
                     nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(), nn.Dense(128), nn.ReLU(), nn.Dense(10)), (128, 784)


def lstm_workload():
    """bench_sequence.py's LSTM (hidden 256, last step -> Dense 10) and its batch shape (64, 64, 32)."""
    from fbp import nn

    return nn.Serial(nn.LSTM(256), nn.LastStep(), nn.Dense(10)), (64, 64, 32)


def transformer_workload():
    """bench_sequence.py's pre-LN transformer block (d 256, 4 heads, MLP 1024), mean over time ->
    Dense 10, and its batch shape (16, 128, 256)."""
    from fbp import nn

    return nn.Serial(nn.TransformerBlock(4, 1024), nn.GlobalAvgPool(), nn.Dense(10)), (16, 128, 256)


def sgd(params, grads, lr=1e-2):
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)


def random_batch(model, shape, classes: int = 10):
    """The benchmarks' shared inputs: ``(params, x, y)`` from ``PRNGKey(0)`` split three ways —
    a standard-normal batch of ``shape``, integer labels below ``classes``, and ``model.init``."""
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape)
    y = jax.random.randint(ky, (shape[0],), 0, classes)
    return model.init(kp, x), x, y
