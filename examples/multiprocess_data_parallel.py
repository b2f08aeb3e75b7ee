"""Data-parallel training across two processes, compared with one process holding all devices.

Run: ``python examples/multiprocess_data_parallel.py`` (no extras needed). It starts

* two worker processes on this machine, each with 2 CPU devices, joined by
  ``jax.distributed.initialize`` (coordinator on 127.0.0.1, CPU collectives over gloo) into one
  4-device mesh; each process feeds only **its own half** of every batch
  (``jax.make_array_from_process_local_data``);
* one reference process holding 4 CPU devices that trains the same model on the same batches;

and prints ``max param diff vs single process: …`` after 20 Adam steps.

The step is the ordinary ``fbp.train.make_step(..., mesh=fbp.parallel.data_mesh())``: the same
code runs on one device, on several devices of one process, and on devices spread over
processes. On a cluster ``jax.distributed.initialize()`` takes no arguments — it reads Slurm's
(``srun``), Kubernetes' (JobSet/indexed jobs) and Cloud TPU's environment itself; only the
local-device setup below (``--xla_force_host_platform_device_count``, gloo) is particular to
simulating a cluster on one CPU machine.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile

STEPS, BATCH, FEATURES, CLASSES = 20, 32, 8, 4


def _cpu_devices(n: int) -> dict:
    """The environment of a process with ``n`` simulated CPU devices: the caller's own XLA flags
    are kept, any device count among them replaced."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return {**os.environ, "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={n}"]),
            "JAX_PLATFORMS": "cpu"}


def train(process_id: int, num_processes: int, port: int, out: str) -> None:
    """One process's part (or, with ``num_processes=1``, the whole): 20 data-parallel Adam steps."""
    import jax
    import numpy as np

    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id)
    from fbp import losses, nn, optim, parallel
    from fbp import train as ftrain

    mesh = parallel.data_mesh()  # every device of every process
    model = nn.Serial(nn.Dense(32), nn.Tanh(), nn.Dense(CLASSES))
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    x_all = jax.random.normal(jax.random.PRNGKey(0), (STEPS * BATCH, FEATURES))
    y_all = jax.random.randint(jax.random.PRNGKey(1), (STEPS * BATCH,), 0, CLASSES)
    params = model.init(jax.random.PRNGKey(2), x_all[:1])  # the same on every process (same key)
    opt = optim.adam(1e-2)
    step = ftrain.make_step(model, loss, opt, mesh=mesh)
    params = parallel.place(params, parallel.replicated(mesh))
    opt_state = parallel.place(opt.init(params), parallel.replicated(mesh))
    rows = BATCH // num_processes  # this process's share of each batch
    for i in range(STEPS):
        lo = i * BATCH + process_id * rows
        x = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), np.asarray(x_all[lo:lo + rows]))
        y = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), np.asarray(y_all[lo:lo + rows]))
        params, opt_state, value = step(params, opt_state, x, y)
    flat = {"/".join(map(str, path)): np.asarray(leaf.addressable_data(0))
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if process_id == 0:
        np.savez(out, **{k.replace("/", "_"): v for k, v in flat.items()}, loss=np.asarray(value.addressable_data(0)))
    if num_processes > 1:
        jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        port, me = _free_port(), os.path.abspath(__file__)
        # the workers' own output (gloo's and the coordinator's log lines) is kept, and shown only on failure
        logs = [open(os.path.join(tmp, f"worker{i}.log"), "w+") for i in range(2)]  # noqa: SIM115
        workers = [subprocess.Popen([sys.executable, me, "--worker", str(i), "--num-processes", "2", "--port",
                                     str(port), "--out", os.path.join(tmp, "multi.npz")], env=_cpu_devices(2),
                                    stdout=logs[i], stderr=subprocess.STDOUT)
                   for i in range(2)]
        single = subprocess.run([sys.executable, me, "--worker", "0", "--num-processes", "1", "--port", "0",
                                 "--out", os.path.join(tmp, "single.npz")], env=_cpu_devices(4), timeout=600,
                                capture_output=True, text=True)
        codes = [w.wait(timeout=600) for w in workers]
        if single.returncode or any(codes):
            for i, log in enumerate(logs):
                log.seek(0)
                print(f"--- worker {i} ---\n{log.read()[-3000:]}", file=sys.stderr)
            print(f"--- single process ---\n{single.stdout[-1500:]}{single.stderr[-3000:]}", file=sys.stderr)
            raise SystemExit(f"a process failed: workers {codes}, single process {single.returncode}")
        for log in logs:
            log.close()
        multi, ref = np.load(os.path.join(tmp, "multi.npz")), np.load(os.path.join(tmp, "single.npz"))
        diff = max(float(np.max(np.abs(multi[k] - ref[k]))) for k in ref.files)
    print(f"2 processes x 2 CPU devices vs 1 process x 4 CPU devices, {STEPS} Adam steps, batch {BATCH}: "
          f"loss {float(multi['loss']):.6f} vs {float(ref['loss']):.6f}")
    print(f"max param diff vs single process: {diff:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        main()
    else:
        train(args.worker, args.num_processes, args.port, args.out)
