"""What a check returns: one ``Row`` per comparison, a ``Report`` that prints as a table, and the
table formatter that ``python -m fbp check`` shares."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison: a leaf (``path``) of fbp's gradient against one reference.

    Attributes:
        path: the parameter path (``"2/w"``) or ``"x"`` for the input gradient.
        against: ``"jax"`` or ``"fd"`` (finite differences).
        max_abs: the largest absolute difference.
        max_rel: the largest relative difference.
        worst: the index of the worst entry.
        actual: fbp's value there.
        desired: the reference's value there.
        ok: the verdict.
        error: what is judged: min(relative error, absolute error / gradient scale).
    """

    path: str
    against: str  # "jax" or "fd"
    max_abs: float
    max_rel: float
    worst: str
    actual: float
    desired: float
    ok: bool
    error: float = math.nan  # what is judged: min(relative error, absolute error / gradient scale)


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of a check; ``str(report)`` is the table, ``report.ok`` the verdict.

    Attributes:
        subject: the layer, loss or model checked (its repr).
        dtype: the precision checked in.
        rows: one ``Row`` per leaf and reference.
        notes: paths whose rule deviates from the gradient by design, and how.
    """

    subject: str
    dtype: str
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()  # paths whose rule deviates from the gradient by design, and how

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> tuple[Row, ...]:
        return tuple(row for row in self.rows if not row.ok)

    def __str__(self) -> str:
        header = ("path", "vs", "max abs err", "max rel err", "judged err", "worst index", "actual (fbp)", "desired",
                  "")
        lines = [(r.path, r.against, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", judged(r), r.worst,
                  f"{r.actual:+.6e}", f"{r.desired:+.6e}", "ok" if r.ok else "FAIL") for r in self.rows]
        verdict = "PASS" if self.ok else f"FAIL ({len(self.failures)} of {len(self.rows)} comparisons)"
        return "\n".join([f"{self.subject}  [{self.dtype}]  {verdict}", *self.notes, format_table(header, lines),
                          JUDGED])

    def _repr_pretty_(self, printer, cycle):  # IPython / notebooks
        printer.text(str(self))

    def assert_ok(self) -> Report:
        """Raise ``AssertionError`` with the table if any comparison failed."""
        if not self.ok:
            raise AssertionError("fbp.check: hand-written gradient disagrees with the reference\n" + str(self))
        return self


JUDGED = ("judged err: the relative error, or the absolute error over the gradient's scale (abs/scale) where "
          "that is smaller — an entry near zero (a zero gradient) has no meaningful relative error")


def judged(row: Row) -> str:
    """The error a row is judged on, and which one it is: ``"3.1e-12 (rel)"`` or ``"2.0e-17 (abs/scale)"``.

    Args:
        row: a comparison.

    Returns:
        The text for the table.
    """
    if math.isnan(row.error):
        return "nan"
    basis = "rel" if row.error == row.max_rel else "abs/scale"
    return f"{row.error:.1e} ({basis})"


def format_table(header, lines) -> str:
    """Rows of cells as left-aligned columns two spaces apart (the check report, ``python -m fbp check``).

    Args:
        header: the column titles.
        lines: the rows, each with one cell per column.

    Returns:
        The table as text, one line per row, trailing spaces stripped.
    """
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line).rstrip() for line in [header, *lines])
