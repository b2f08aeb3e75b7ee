"""The command line: ``python -m fbp check``."""

from __future__ import annotations

import argparse
import sys


def _check(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from fbp import catalog

    dtype = {"float64": jnp.float64, "float32": jnp.float32}[args.dtype]
    reports = catalog.run(dtype=dtype, jit=args.jit)
    print(summary_table(reports))
    for report in reports:
        if args.verbose or not report.ok:
            print("\n" + str(report))
    failed = [r for r in reports if not r.ok]
    rows = sum(len(r.rows) for r in reports)
    print(f"\n{len(reports) - len(failed)} of {len(reports)} rules pass ({rows} comparisons against JAX's grad "
          f"and finite differences, {args.dtype}{', jit' if args.jit else ''}).")
    return 1 if failed else 0


def summary_table(reports) -> str:
    """One line per rule: the worst relative error against JAX's grad and against differences."""
    header = ("rule", "vs jax: max rel err", "vs finite diff: max rel err", "")
    lines = []
    for r in reports:
        worst = {kind: max((row.max_rel for row in r.rows if row.against == kind), default=0.0)
                 for kind in ("jax", "fd")}
        name = r.subject.split(": ", 1)[1]
        lines.append((name if len(name) <= 70 else name[:67] + "...", f"{worst['jax']:.1e}", f"{worst['fd']:.1e}",
                      "ok" if r.ok else "FAIL"))
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line).rstrip() for line in [header, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fbp", description="fbp: functional backpropagation for JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="verify every built-in backward rule against JAX's grad and "
                                           "finite differences")
    p_check.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p_check.add_argument("--jit", action="store_true", help="run fbp's rules under jax.jit")
    p_check.add_argument("-v", "--verbose", action="store_true", help="print every comparison, not only failures")
    p_check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
