"""Execute every notebook in notebooks/ and write the copy with its outputs to docs/notebooks/.

The site renders those copies (mkdocs-jupyter, never re-executed at build time); the sources in
notebooks/ stay without outputs, so their diffs show code and prose only. Run it after changing
a notebook: ``python docs/execute_notebooks.py [NAME ...]``. ``tests/test_docs.py`` fails while a
copy's cells differ from its source.
"""

from __future__ import annotations

import os
import pathlib
import sys

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES, RENDERED = ROOT / "notebooks", ROOT / "docs" / "notebooks"


def execute(path: pathlib.Path) -> pathlib.Path:
    """Run ``path`` top to bottom in a fresh kernel and save the executed copy."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:  # execution counts and timings would make every regeneration a diff
        cell.get("metadata", {}).pop("execution", None)
    out = RENDERED / path.name
    nbformat.write(nb, out)
    return out


def main(names: list[str]) -> None:
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend, so figures land in the outputs
    RENDERED.mkdir(parents=True, exist_ok=True)
    for path in sorted(SOURCES.glob("*.ipynb")):
        if not names or path.stem in names or path.name in names:
            print(f"{path.name} -> {execute(path).relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
