"""The documentation cannot rot: its code runs, its notebooks match their sources, and the API
reference covers every module."""

import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "```python" in p.read_text()) + \
    ["../README.md"]  # every page with Python code, and the README: every block must run


def _python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_every_page_with_code_is_run():
    assert len(RUNNABLE) >= 12 and "guides/training.md" in RUNNABLE and "guides/contracts.md" in RUNNABLE


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_python_block_of_the_page_runs(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a page that writes files writes them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
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


def _public_objects():
    """``(qualified name, object)`` for every public function and class, in the module that defines it."""
    import importlib
    import pkgutil

    import fbp

    for info in pkgutil.walk_packages(fbp.__path__, "fbp."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                yield f"{module.__name__}.{name}", obj


def _documentation_problems(name, obj) -> list[str]:
    """What one public function or dataclass leaves undocumented (Google style, one entry per argument)."""
    import dataclasses
    import inspect

    doc = inspect.getdoc(obj) or ""
    named = lambda arg: any(f"    {star}{arg}:" in doc for star in ("", "*", "**"))  # noqa: E731
    if inspect.isfunction(obj):
        args = [p.name for p in inspect.signature(obj).parameters.values() if p.kind is not p.VAR_KEYWORD]
        if not args:
            return []
        sections = "Args:" in doc and any(s in doc for s in ("Returns:", "Yields:", "Raises:"))
        return ([] if sections else [f"{name}: Args and Returns (or Raises) sections"]) + \
            [f"{name}: argument {a!r}" for a in args if not named(a)]
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return [f"{name}: setting {f.name!r}" for f in dataclasses.fields(obj) if f.init and not named(f.name)]
    return []


def test_every_public_function_and_dataclass_documents_its_arguments():
    objects = list(_public_objects())
    assert len(objects) > 300, "the walk over fbp's modules found too little"
    problems = [p for name, obj in objects for p in _documentation_problems(name, obj)]
    assert problems == [], "Google-style docstrings (Args/Returns, one entry per argument) are missing:\n" + \
        "\n".join(problems)


def test_the_documentation_check_catches_a_missing_argument():
    def f(a, b):
        """Adds.

        Args:
            a: the first.

        Returns:
            The sum.
        """

    def g(a):
        """No sections."""

    assert _documentation_problems("f", f) == ["f: argument 'b'"]
    assert _documentation_problems("g", g) == ["g: Args and Returns (or Raises) sections", "g: argument 'a'"]


def test_no_rendered_notebook_shows_a_library_warning_stream():
    """dp-accounting's absl lines once filled the privacy notebook (about 60 of them)."""
    for path in sorted(DOCS.glob("notebooks/*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream":
                    assert "WARNING:absl" not in out.get("text", ""), path.name
