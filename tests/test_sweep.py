"""A generated sweep: one bad value per argument of every public constructor and factory.

The subjects are found by introspection (every public class and function of the modules in
``MODULES`` that is defined in fbp), not picked by hand; each argument whose default (or
sample) is a bool, an int, a float or a string gets the bad values of its kind:

* **must be refused** — a value of the wrong type (text for a number, a string for a bool, a
  fraction for an int, a number for a string), NaN and inf for a float, an unknown word for a
  choice — with a ``TypeError``/``ValueError`` whose message names the argument;
* **refused or handled** — zero and a negative number: construction either succeeds (the value
  is meaningful: an axis of -1, a weight decay of 0) or raises a ``TypeError``/``ValueError``
  naming the argument; any other exception (a ``ZeroDivisionError``, a message that names
  nothing) fails.

Only construction runs (no compilation), so the sweep is fast. A required argument is filled
from ``SAMPLES``; a public callable with a required argument that has no sample fails
``test_every_public_callable_is_swept`` until a sample is added.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import pytest

from fbp import (
    accounting,
    augment,
    checkpoint,
    credit,
    curvature,
    data,
    influence,
    kfac,
    lanczos,
    laplace,
    linear_pass,
    losses,
    nn,
    optim,
    per_example,
    precision,
    privacy,
    second_order,
    spectrum,
    telemetry,
    train,
)
from fbp.core import InputError

MODULES = [nn, losses, optim, augment, accounting, precision, privacy, kfac, curvature, credit, per_example,
           telemetry, train, data, checkpoint, spectrum, laplace, influence, second_order, linear_pass, lanczos]
CCE = losses.CategoricalCrossEntropy(from_logits=True)
MODEL = nn.Serial(nn.Dense(4), nn.Tanh(), nn.Dense(3))

SAMPLES = {  # a valid value for each required argument, by name
    "features": 3, "hidden": 3, "num_heads": 2, "num_groups": 1, "learning_rate": 0.1, "model": MODEL, "loss": CCE,
    "optimizer": optim.sgd(0.1), "layer": nn.Dense(3), "l2_clip": 1.0, "noise_multiplier": 1.0,
    "expected_batch_size": 8.0, "kernel_size": 3, "rate": 0.5, "shape": (3,), "vocab": 7, "max_len": 8,
    "fn": jnp.tanh, "factor": 0.5, "padding": 1, "stddev": 0.1, "probability": 0.5, "window": 2, "pool_size": 2,
    "mlp_dim": 8, "embed_dim": 4, "init_value": 0.1, "end_value": 0.0, "transition_steps": 10, "decay_rate": 0.5,
    "decay_steps": 10, "peak_value": 0.1, "warmup_steps": 2, "boundaries_and_scales": {5: 0.5}, "value": 0.1,
    "max_norm": 1.0, "max_delta": 1.0, "step_size": 0.1, "sample_rate": 0.01, "steps": 10, "delta": 1e-5,
    "target_epsilon": 1.0, "monitor": "val_loss", "n": 10, "batch_size": 2, "x": jnp.ones((4, 3)),
    "y": jnp.arange(4) % 3, "test_fraction": 0.25, "weight_decay": 0.01, "transforms": (), "schedules": (),
    "boundaries": (), "directory": "unused-dir", "tree": {}, "step": 0, "target": {}, "path": "unused.idx",
    "sigma": 0.1, "init_scale": 2.0, "schedule": optim.constant_schedule(0.1), "decay": 0.9, "eps": 1e-8,
    "vocab_size": 7, "dim": 4, "out_features": 3, "channels": 3, "strides": 1, "mc_samples": 1, "epochs": 1,
    "key": None, "augments": (), "layers": (), "block": nn.Dense(3), "quantizer": nn.Sign(), "params": {},
    "coefficient": 0.01, "checkpoints": [MODEL.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))],
    "op": spectrum.operator(MODEL, CCE, MODEL.init(jax.random.PRNGKey(0), jnp.ones((4, 3))), jnp.ones((4, 3)),
                            jnp.arange(4) % 3),
    "matvec": lambda v: 2 * v, "iterations": 3, "dtype": jnp.float32, "like": jnp.ones(3),
}
SKIP = {  # public callables that take no plain-value hyperparameter (arrays, pytrees, callables, files only)
    "apply_updates", "global_norm", "chain", "join_schedules", "learning_rate", "compose", "validate",
    "train_test_split", "batches", "read_idx", "load_mnist", "evaluate", "fit", "make_step", "restore",
    "all_steps", "latest_step", "step_directory", "saved_paths", "check_directory", "save", "routes", "run",
    "backward_columns", "with_context", "poisson_batch", "max_batch", "buffer_rows", "private_step", "current_scale",
    "value_grad_and_output", "correct_count", "plot_gradient_flow", "zero_stats", "record_epoch", "probe",
    "input_side", "floating_leaves", "Instrumented", "telemetry_stats", "epoch_batches", "compiled_epoch",
    "gradient_function", "examples_counted", "diag_hessian", "layer", "FunctionLayer", "Activation",
    "Layer", "Loss", "GradientTransformation", "KFAC", "KFACState", "KroneckerBlock", "Factors", "Dataset",
    "FitResult", "LossScaleState", "sign_symmetry", "assemble", "exact_model", "DirectFeedbackAlignment",
    "sign_feedback", "draw_by_length", "probe_model", "split_probed", "one_pass", "block_matrix", "block_entries",
    "Dense", "Diagonal", "Kronecker", "Laplace", "Influence", "Term", "hessian_product_of_pass", "plot_density",
    "loss_hessian_product", "require", "require_like_params", "second_order", "add", "jacobian_vector_product",
    "tangent", "declares_rule", "declares_tangent",
}
FREE_TEXT = {"name", "monitor", "directory", "path"}  # any string is a valid value
INF_OK = {"l2_clip", "max_norm", "max_delta", "patience"}  # inf means "no bound" for these
NEGATIVE_OK = {"axis", "negative_slope", "factor", "min_delta"}


def _public(module):
    listed = getattr(module, "__all__", None)
    for name in listed or [n for n in dir(module) if not n.startswith("_")]:
        obj = getattr(module, name, None)
        if not callable(obj) or name in SKIP or not getattr(obj, "__module__", "").startswith("fbp"):
            continue
        if listed is None and obj.__module__ != module.__name__:  # imported from elsewhere: swept there
            continue
        if inspect.isclass(obj) and (issubclass(obj, tuple) or not hasattr(obj, "__dataclass_fields__")):
            continue  # state containers (NamedTuples) and plain classes hold no hyperparameters
        yield f"{module.__name__}.{name}", obj


def _kind(param, sample):
    value = param.default if param.default is not inspect.Parameter.empty else sample
    annotation = str(param.annotation)
    if isinstance(value, bool) or annotation == "bool":
        return "bool"
    if isinstance(value, int) or annotation in ("int", "int | None"):
        return "int"
    if isinstance(value, float) or annotation in ("float", "float | None"):
        return "float"
    if isinstance(value, str) or annotation in ("str", "str | None"):
        return "str"
    return None


BAD = {"bool": [("must", "yes"), ("must", 2.0)],
       "int": [("must", "3"), ("must", 2.5), ("either", 0), ("either", -1)],
       "float": [("must", "0.1"), ("must", math.nan), ("must", math.inf), ("either", 0.0), ("either", -1.0)],
       "str": [("must", 3), ("must", "no-such-choice")]}


def _cases():
    cases, unswept = [], []
    for module in MODULES:
        for qual, obj in _public(module):
            try:
                sig = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            required = {p.name: SAMPLES[p.name] for p in params if p.default is p.empty and p.name in SAMPLES}
            missing = [p.name for p in params if p.default is p.empty and p.name not in SAMPLES]
            if missing:
                unswept.append(f"{qual}({', '.join(missing)})")
                continue
            for p in params:
                kind = _kind(p, required.get(p.name))
                if kind is None or (kind == "str" and p.name in FREE_TEXT):
                    continue
                for severity, bad in BAD[kind]:
                    if (bad == math.inf and p.name in INF_OK) or (severity == "either" and kind == "float"
                                                                   and p.name in NEGATIVE_OK):
                        continue
                    cases.append(pytest.param(obj, required, p.name, bad, severity,
                                              id=f"{qual}-{p.name}={bad!r}"))
    return cases, unswept


CASES, UNSWEPT = _cases()


def test_every_public_callable_is_swept():
    """A public callable with a required argument without a sample is not silently left out."""
    assert UNSWEPT == [], "add a sample for these arguments to SAMPLES (or the callable to SKIP): " + str(UNSWEPT)
    assert len(CASES) > 400


@pytest.mark.parametrize("obj, required, name, bad, severity", CASES)
def test_one_bad_value_per_argument(obj, required, name, bad, severity):
    kwargs = dict(required)
    kwargs[name] = bad
    try:
        obj(**kwargs)
    except (TypeError, ValueError, InputError) as err:  # refused: the message must name the argument
        assert name in str(err), f"{obj.__name__}({name}={bad!r}) raised without naming {name!r}: {err}"
        return
    except Exception as err:  # noqa: BLE001 - anything else is a traceback that names nothing of ours
        pytest.fail(f"{obj.__name__}({name}={bad!r}) raised {type(err).__name__}: {err}")
    assert severity == "either", f"{obj.__name__}({name}={bad!r}) was accepted silently"
