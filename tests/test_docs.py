"""The documentation cannot rot: its code runs, its notebooks match their sources, and the API
reference covers every module."""

import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = ["getting-started.md", "guides/own-layer.md", "guides/curvature.md", "index.md"]


def _python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_python_block_of_the_page_runs(name, capsys):
    blocks = _python_blocks(DOCS / name)
    assert blocks, f"{name} has no python block"
    namespace = {}
    for block in blocks:  # one namespace per page: a page's blocks build on each other
        exec(compile(block, f"{name}", "exec"), namespace)  # noqa: S102
    capsys.readouterr()


def test_the_rendered_notebooks_are_the_sources_with_outputs():
    sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
    rendered = {p.name: p for p in (DOCS / "notebooks").glob("*.ipynb")}
    assert sorted(rendered) == [p.name for p in sources], "run python docs/execute_notebooks.py"
    for path in sources:
        src, out = nbformat.read(path, as_version=4), nbformat.read(rendered[path.name], as_version=4)
        assert [(c.cell_type, c.source) for c in src.cells] == [(c.cell_type, c.source) for c in out.cells], \
            f"docs/notebooks/{path.name} is stale: run python docs/execute_notebooks.py {path.stem}"
        code = [c for c in out.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"docs/notebooks/{path.name} was not executed"
        assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]


def test_the_api_reference_covers_every_module_and_the_nav_every_page():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "fbp").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    documented = {m for page in (DOCS / "reference").glob("*.md") for m in re.findall(r"^::: (\S+)", page.read_text(),
                                                                                       flags=re.M)}
    assert modules - documented == set(), "add ::: lines to a page under docs/reference/"
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*") if p.suffix in (".md", ".ipynb")}
    assert {p for p in pages if p not in nav} == set(), "list every page in mkdocs.yml's nav"


KEY_FUNCTIONS = ["fbp.core.value_and_grad", "fbp.core.grad", "fbp.core.vjp", "fbp.core.to_jax", "fbp.core.layer",
                 "fbp.check.layer", "fbp.check.loss", "fbp.check.model", "fbp.steps.make_step", "fbp.train.fit",
                 "fbp.telemetry.value_grad_and_stats", "fbp.per_example.grads", "fbp.per_example.grad_norms",
                 "fbp.privacy.clipped_grad", "fbp.curvature.diag_ggn", "fbp.curvature.diag_ggn_mc",
                 "fbp.curvature.ggn_vector_product", "fbp.curvature.kfac_factors", "fbp.curvature.diag_hessian",
                 "fbp.kfac.kfac", "fbp.check.curvature",
                 *(f"fbp.optim.{n}" for n in ("sgd", "adagrad", "rmsprop", "adam", "adamw", "constant_schedule",
                                              "linear_schedule", "exponential_decay", "piecewise_constant_schedule",
                                              "cosine_decay_schedule", "join_schedules",
                                              "warmup_cosine_decay_schedule")),
                 *(f"fbp.data.{n}" for n in ("train_test_split", "batch_indices", "batches", "load_digits",
                                             "load_breast_cancer", "load_diabetes", "read_idx", "load_mnist")),
                 *(f"fbp.checkpoint.{n}" for n in ("step_directory", "all_steps", "latest_step", "save", "restore")),
                 *(f"fbp.parallel.{n}" for n in ("data_mesh", "batch_sharding", "replicated", "fsdp_sharding",
                                                 "place")),
                 "fbp.privacy.private_grad", "fbp.privacy.max_batch", "fbp.privacy.poisson_batch",
                 "fbp.accounting.epsilon", "fbp.accounting.calibrate_noise", "fbp.augment.random_crop",
                 "fbp.augment.horizontal_flip", "fbp.augment.gaussian_noise", "fbp.credit.feedback_alignment",
                 "fbp.credit.sign_symmetry", "fbp.credit.direct_feedback_alignment", "fbp.debug.find_nonfinite",
                 *(f"fbp.optim.{n}" for n in ("scale", "scale_by_learning_rate", "trace", "scale_by_rss",
                                              "scale_by_rms", "scale_by_stddev", "scale_by_adam", "add_decayed_weights",
                                              "add_l2_penalty", "add_l1_penalty", "clip", "clip_by_global_norm",
                                              "apply_updates", "global_norm")),
                 "fbp.optim.base.transformation",
                 *(f"fbp.nn.init.{n}" for n in ("variance_scaling", "constant", "normal", "uniform", "orthogonal")),
                 "fbp.per_example.routes", "fbp.per_example.sum_grad_squared", "fbp.per_example.variance"]


@pytest.mark.parametrize("name", KEY_FUNCTIONS)
def test_the_central_functions_document_their_arguments_and_result(name):
    import importlib
    import inspect

    module, attr = name.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), attr)
    doc = inspect.getdoc(fn)
    assert "Args:" in doc and "Returns:" in doc, f"{name}: Google-style Args and Returns sections"
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind is not parameter.VAR_KEYWORD:
            assert f"    {parameter.name}:" in doc, f"{name}: argument {parameter.name!r} is not documented"


DOCUMENTED_LAYERS = ["Dense", "Conv1D", "Conv2D", "MaxPool2D", "AvgPool2D", "BatchNorm", "LayerNorm", "GroupNorm",
                     "Embedding", "SimpleRNN", "LSTM", "GRU", "MultiHeadAttention", "TransformerBlock",
                     "LearnedPositionalEmbedding", "Residual", "LeakyReLU", "ELU", "GELU", "Softmax", "LogSoftmax",
                     "ScaleGradient", "GradientReversal", "MapCotangent", "Sign", "Round", "QuantizeWeights",
                     "Dropout", "losses.MSE", "losses.MAE", "losses.Huber", "losses.BinaryCrossEntropy",
                     "losses.Hinge", "losses.CategoricalCrossEntropy", "losses.MulticlassHinge"]


@pytest.mark.parametrize("name", DOCUMENTED_LAYERS)
def test_the_main_layers_document_every_setting(name):
    import dataclasses
    import inspect

    import fbp
    from fbp import nn

    cls = getattr(fbp, name.split(".")[0]).__dict__[name.split(".")[1]] if "." in name else getattr(nn, name)
    doc = inspect.getdoc(cls)
    assert "Args:" in doc, f"nn.{name}: an Args section"
    for field in dataclasses.fields(cls):
        if field.init:
            assert f"    {field.name}:" in doc, f"nn.{name}: setting {field.name!r} is not documented"
