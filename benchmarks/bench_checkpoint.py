"""Checkpoint save and restore of a 100M-parameter model against the disk's own speed.

The model's state is ``--params`` float32 numbers (default 100M: 400 MB) in leaves of 10M, as
params + Adam's two moments would be for a 33M-parameter model. Per round, interleaved:

  * ``disk``: the same bytes written raw (``ndarray.tofile`` per leaf, then ``fsync``) — what
    the disk allows;
  * ``save``: ``fbp.checkpoint.save`` (``.npz`` + SHA-256 + manifest, fsync, rename);
  * ``restore``: ``fbp.checkpoint.restore`` (checksum, then read);
  * ``read``: the raw files read back.

The writers run in a rotating order, each after ``os.sync()`` (so none pays for the last one's
dirty pages); the reads follow them.

With ``--processes 2`` it also times the same state saved by two processes (two simulated
devices each, ``jax.distributed`` over gloo), the big leaves sharded over the four devices
(each process writes its own shards), and restored in one process.

Run: ``python benchmarks/bench_checkpoint.py [--params 100e6] [--rounds 3] [--processes 2]``.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

LEAF = 10_000_000


def _tree(total: int) -> dict:
    rng = np.random.default_rng(0)
    sizes = [LEAF] * (total // LEAF) + ([total % LEAF] if total % LEAF else [])
    return {f"w{i}": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)}


def _raw_write(tree, where):
    os.makedirs(where, exist_ok=True)
    for name, a in tree.items():
        with open(os.path.join(where, name), "wb") as f:
            a.tofile(f)
            f.flush()
            os.fsync(f.fileno())


def _raw_read(tree, where):
    return {name: np.fromfile(os.path.join(where, name), np.float32) for name in tree}


def _size(where) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(where) for f in files)


def _two_processes(total: int, directory: str) -> float:
    """Seconds for two processes to save the state sharded over their four devices (the slower one)."""
    out = os.path.join(directory, "times")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = 12000 + os.getpid() % 1000
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--port", str(port), "--params",
                               str(total), "--dir", directory], env=env) for i in range(2)]
    if any(p.wait() for p in procs):
        raise SystemExit("a worker failed")
    return max(float(open(f"{out}{i}").read()) for i in range(2))


def _worker(pid: int, port: int, total: int, directory: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from fbp import checkpoint, parallel

    mesh = parallel.data_mesh()
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA))
    tree = {k: jax.make_array_from_callback(v.shape, split, lambda i, v=v: v[i]) for k, v in _tree(total).items()}
    jax.block_until_ready(tree)
    start = time.perf_counter()
    checkpoint.save(os.path.join(directory, "ck"), tree, 1)
    seconds = time.perf_counter() - start
    with open(os.path.join(directory, f"times{pid}"), "w") as f:
        f.write(str(seconds))
    jax.distributed.shutdown()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, choices=(1, 2))
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    total = int(args.params)
    if args.worker is not None:
        return _worker(args.worker, args.port, total, args.dir)
    from fbp import checkpoint

    tree = _tree(total)
    base = tempfile.mkdtemp(dir=args.dir)
    times = {"disk": [], "save": [], "restore": [], "read": []} | ({"save, 2 processes": []} if args.processes == 2
                                                                  else {})
    try:
        names = list(times)
        for r in range(args.rounds):
            writes = [n for n in names if n != "restore" and n != "read"]
            writes = writes[r % len(writes):] + writes[:r % len(writes)]  # rotating order: no one always first
            for name in writes + ["restore", "read"]:
                where = os.path.join(base, f"{name}-{r}")
                os.sync()  # nothing of the last candidate's writes left to flush on this one's time
                start = time.perf_counter()
                if name == "disk":
                    _raw_write(tree, where)
                elif name == "save":
                    checkpoint.save(where, tree, 1)
                elif name == "restore":
                    checkpoint.restore(os.path.join(base, f"save-{r}"), tree)
                elif name == "read":
                    _raw_read(tree, os.path.join(base, f"disk-{r}"))
                else:
                    os.makedirs(where)
                    times[name].append(_two_processes(total, where))
                    continue
                times[name].append(time.perf_counter() - start)
        gb = total * 4 / 1e9
        print(f"{total / 1e6:.0f}M float32 parameters ({gb:.2f} GB) in {len(tree)} leaves; {args.rounds} rounds")
        print(f"  bytes on disk: raw {_size(os.path.join(base, 'disk-0'))}, checkpoint "
              f"{_size(os.path.join(base, 'save-0'))}")
        for name, t in times.items():
            print(f"  {name}: median {statistics.median(t):.2f} s ({gb / statistics.median(t):.2f} GB/s), "
                  f"range {min(t):.2f}–{max(t):.2f} s")
        disk, read = statistics.median(times["disk"]), statistics.median(times["read"])
        print(f"  save / raw write: {statistics.median(times['save']) / disk:.2f}; "
              f"restore / raw read: {statistics.median(times['restore']) / read:.2f}")
        if args.processes == 2:
            print(f"  save by 2 processes / raw write: {statistics.median(times['save, 2 processes']) / disk:.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
