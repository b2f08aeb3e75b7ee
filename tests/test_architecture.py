"""The direction of imports: the engine never imports a layer family.

What a family can give (per-example rules, Kronecker factors, second derivatives, batch
independence, being a chain) is declared in that family's own file, beside its forward and
backward; the engine reads the declarations. So a new family is one file (plus its catalogue
entry and tests), and no module of the engine names one.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fbp"
# Helpers the families share with the engine; they define no layer.
HELPERS = {"fbp.nn.positions", "fbp.nn.init", "fbp.nn.function"}
# Where families are assembled (the catalogue and its capability table, the command line, the
# package namespace) or
# defined (fbp.credit's layers, the families' own packages).
ASSEMBLY = {"catalog", "capabilities", "__main__", "__init__", "credit"}


def _engine_modules():
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.parent.name not in ("nn", "losses") and p.stem not in ASSEMBLY)


def _fbp_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fbp"):
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fbp")}
    return found


def _families(imports: set[str]) -> set[str]:
    """The family modules (``fbp.nn.*``, ``fbp.losses.*``) among ``imports``, helpers excepted."""
    out = set()
    for name in imports:
        parts = name.split(".")
        if len(parts) >= 2 and parts[1] in ("nn", "losses") and ".".join(parts[:3]) not in HELPERS:
            out.add(".".join(parts[:3]))
    return out


@pytest.mark.parametrize("path", _engine_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_engine_imports_no_layer_family(path):
    assert not _families(_fbp_imports(path)), (
        f"{path.name} imports a layer family; declare what the engine needs on the family's class instead")


def test_the_rule_catches_a_family_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fbp.nn.conv import Conv2D\n    return Conv2D\nfrom fbp.nn import positions\n")
    assert _families(_fbp_imports(bad)) == {"fbp.nn.conv"}
    bad.write_text("import fbp.losses.classification\nfrom fbp import nn\n")
    assert _families(_fbp_imports(bad)) == {"fbp.losses.classification", "fbp.nn"}
