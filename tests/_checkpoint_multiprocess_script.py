"""One process of the multi-process checkpoint test (``tests/test_checkpoint_multiprocess.py``).

``python _checkpoint_multiprocess_script.py PROCESS_ID NUM_PROCESSES PORT DIR OUT [--die-at-epoch K]
[--die-in-save STEP] [--shards SHARDS_DIR]``: data-parallel ``fit`` over every device of every
process, checkpointing into ``DIR`` every epoch and resuming from it if it holds a step; the
final params (process 0) go to ``OUT`` (``.npz``). ``--die-at-epoch K`` kills the processes when
epoch ``K`` (0-based) starts, ``--die-in-save STEP`` while saving ``STEP`` (every shard written,
nothing committed): as a job killed mid-epoch or mid-save. ``--shards`` also saves an FSDP-sharded
tree into ``SHARDS_DIR`` and restores it on the same processes.
"""

import argparse
import os

EPOCHS, N, BATCH, FEATURES, CLASSES = 4, 256, 32, 8, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("process_id", "num_processes", "port"):
        parser.add_argument(name, type=int)
    parser.add_argument("directory")
    parser.add_argument("out")
    parser.add_argument("--die-at-epoch", type=int, default=None)
    parser.add_argument("--die-in-save", type=int, default=None)
    parser.add_argument("--shards", default=None)
    args = parser.parse_args()
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id)
    import numpy as np

    from fbp import checkpoint, checkpoint_shards, losses, nn, optim, parallel
    from fbp import train as ftrain

    if args.die_at_epoch is not None:  # killed when that epoch starts: its work is lost
        run_epoch, calls = ftrain._run_epoch, []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) > args.die_at_epoch:
                os._exit(3)
            return run_epoch(*a, **k)

        ftrain._run_epoch = dying
    if args.die_in_save is not None:  # killed with every shard of that step written, before the rename
        sync = checkpoint_shards._sync

        def dying_sync(name):
            if name == f"step {args.die_in_save}: shards written":
                os._exit(4)
            sync(name)

        checkpoint_shards._sync = dying_sync
    x = jax.random.normal(jax.random.PRNGKey(0), (N, FEATURES))
    y = jax.random.randint(jax.random.PRNGKey(1), (N,), 0, CLASSES)
    model = nn.Serial(nn.Dense(32), nn.Tanh(), nn.Dropout(0.1), nn.Dense(CLASSES))
    params = model.init(jax.random.PRNGKey(2), x[:1])
    mesh = parallel.data_mesh()
    result = ftrain.fit(model, losses.CategoricalCrossEntropy(from_logits=True), optim.adam(1e-2), params, x, y,
                        key=jax.random.PRNGKey(3), epochs=EPOCHS, batch_size=BATCH, mesh=mesh, progress=False,
                        checkpoint_dir=args.directory, resume=True, keep_checkpoints=None)
    flat = {"/".join(map(str, p)): np.asarray(leaf.addressable_data(0)) for p, leaf in
            jax.tree_util.tree_leaves_with_path(result.params)}
    if jax.process_index() == 0:
        np.savez(args.out, **{k.replace("/", "_"): v for k, v in flat.items()},
                 loss=np.asarray(result.history["loss"]))
    if args.shards:
        tree = shard_tree(mesh)
        checkpoint.save(args.shards, tree, 7)
        back = checkpoint_shards.place_like(checkpoint.restore(args.shards, tree), tree)
        for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back), strict=True):
            assert type(a) is type(b), (type(a), type(b))
            if isinstance(a, jax.Array):
                assert a.sharding == b.sharding, (a.sharding, b.sharding)
                for s, t in zip(a.addressable_shards, b.addressable_shards, strict=True):
                    assert s.index == t.index and np.array_equal(np.asarray(s.data), np.asarray(t.data))
            else:
                assert a == b
        print("shards restored on the same processes", flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()


def expected_shard_tree() -> dict:
    """The values ``shard_tree`` lays out (what a one-process restore must give)."""
    import numpy as np

    return {"big": np.arange(1024 * 8, dtype=np.float32).reshape(1024, 8) / 7,
            "small": np.arange(5, dtype=np.int32), "name": "fsdp", "count": 3}


def shard_tree(mesh) -> dict:
    """An FSDP-sharded leaf (each device holds a quarter), a replicated one, plain values."""
    import jax

    from fbp import parallel

    values = expected_shard_tree()
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA))
    return {"big": jax.make_array_from_callback((1024, 8), split, lambda i: values["big"][i]),
            "small": parallel.place(values["small"], parallel.replicated(mesh)), "name": "fsdp", "count": 3}


if __name__ == "__main__":
    main()
