"""The command line: ``python -m fbp check`` and ``python -m fbp train``."""

from __future__ import annotations

import argparse
import math
import os
import sys


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _writable_png(text: str) -> str:
    """An output path whose folder exists now, so a typo fails before training, not after."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} is not writable")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name such as curves.png")
    return text


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
    from fbp.report import JUDGED

    print(f"\n{JUDGED}.")
    print(f"{len(reports) - len(failed)} of {len(reports)} rules pass ({rows} comparisons against JAX's grad "
          f"and finite differences, {args.dtype}{', jit' if args.jit else ''}).")
    return 1 if failed else 0


def summary_table(reports) -> str:
    """One line per rule: the worst judged error (relative, or absolute on the gradient's scale
    for leaves whose gradient is zero) against JAX's grad and against finite differences."""
    header = ("rule", "vs jax: judged err", "vs finite diff: judged err", "")
    lines = []
    for r in reports:
        worst = {kind: max((row.error for row in r.rows if row.against == kind), default=0.0)
                 for kind in ("jax", "fd")}
        name = r.subject.split(": ", 1)[1]
        if len(name) > 90:  # keep the case (in brackets) when cutting a long rule's repr
            case = name[name.rfind(" ["):] if name.endswith("]") else ""
            name = name[:90 - len(case) - 3] + "..." + case
        lines.append((name, f"{worst['jax']:.1e}", f"{worst['fd']:.1e}",
                      "ok" if r.ok else "FAIL"))
    from fbp.check import format_table

    return format_table(header, lines)


ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "gelu": "GELU", "silu": "SiLU", "elu": "ELU",
               "leaky_relu": "LeakyReLU", "softplus": "Softplus"}
LOSSES = {"cce": ("CategoricalCrossEntropy", {"from_logits": True}), "hinge": ("MulticlassHinge", {}),
          "mse": ("MSE", {})}
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov", "adagrad", "rmsprop")


def _optimizer(name: str, lr: float):
    from fbp import optim

    if name in ("momentum", "nesterov"):
        return optim.sgd(lr, momentum=0.9, nesterov=name == "nesterov")
    return getattr(optim, name)(lr)


def _train(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from fbp import check, data, losses, nn, precision, train
    from fbp.telemetry import GRADIENT_FLOW

    ds = data.load_digits(test_fraction=0.2, seed=args.seed)
    init = nn.init.he_normal if args.activation in ("relu", "leaky_relu", "elu", "gelu", "silu") \
        else nn.init.glorot_uniform
    layers = []
    for width in args.hidden:
        layers += [nn.Dense(width, kernel_init=init), getattr(nn, ACTIVATIONS[args.activation])()]
    model = nn.Serial(*layers, nn.Dense(10))
    if args.rule != "bp":
        from fbp import credit
        model = {"fa": lambda m: credit.feedback_alignment(m, seed=args.seed), "usf": credit.sign_symmetry,
                 "dfa": lambda m: credit.direct_feedback_alignment(m, ds.x_train[:1], seed=args.seed)}[args.rule](model)
    loss_name, loss_kwargs = LOSSES[args.loss]
    loss = getattr(losses, loss_name)(**loss_kwargs)
    y_train, y_test = ds.y_train, ds.y_test
    if args.loss == "mse":  # regression onto one-hot targets
        y_train, y_test = jax.nn.one_hot(y_train, 10), jax.nn.one_hot(y_test, 10)
    key = jax.random.PRNGKey(args.seed)
    params = model.init(key, ds.x_train)
    print(f"digits: {len(ds.x_train)} train / {len(ds.x_test)} test, 64 features, 10 classes")
    print(f"model: {model!r}\nloss: {loss!r}   optimizer: {args.optimizer}(learning_rate={args.lr})   "
          f"batch size: {args.batch_size or 'full'}   epochs: {args.epochs}   precision: {args.precision}")
    optimizer = _optimizer(args.optimizer, args.lr)
    if args.precision == "float16":  # float16's narrow exponent: dynamic loss scaling
        optimizer = precision.loss_scaled(optimizer)
    result = train.fit(model, loss, optimizer, params, ds.x_train, y_train,
                       key=jax.random.fold_in(key, 1), epochs=args.epochs, batch_size=args.batch_size,
                       validation_split=0.1, progress=not args.no_progress, scan_epochs=True, num_classes=None,
                       early_stopping=train.EarlyStopping("val_loss", patience=args.patience)
                       if args.patience else None, telemetry=GRADIENT_FLOW if args.plot_gradients else False,
                       precision=None if args.precision == "float32" else args.precision,
                       diagnostics=args.diagnostics if args.dashboard else None)
    metrics = train.evaluate(model, loss, result.params, ds.x_test, y_test, state=result.state)
    print(f"trained {result.epochs_run} epochs" + (f", best epoch {result.best_epoch + 1}"
                                                   if result.best_epoch is not None else "")
          + f" ({result.stop_reason})")
    print(f"test loss: {metrics['loss']:.4f}")
    if "accuracy" in metrics:
        print(f"test accuracy: {metrics['accuracy']:.3f}")
    else:  # a regression loss on one-hot targets: the class is the largest output
        pred = model.apply(result.params, jnp.asarray(ds.x_test), state=result.state)
        print(f"test accuracy (largest output): {float(jnp.mean(jnp.argmax(pred, -1) == ds.y_test)):.3f}")
    report = check.model(model, loss, result.params, jnp.asarray(ds.x_test[:32]), jnp.asarray(y_test[:32]),
                         state=result.state)
    worst = {kind: max((row.error for row in report.rows if row.against == kind), default=0.0)
             for kind in ("jax", "fd")}
    print(f"gradient check of the trained model vs JAX autodiff and finite differences (float64, {len(report.rows)} "
          f"comparisons): {'PASS' if report.ok else 'FAIL'}, worst relative error {worst['jax']:.1e} (jax), "
          + (f"{worst['fd']:.1e} (finite differences)" if not report.notes else
             "n/a (finite differences: skipped, the rule deviates from the gradient by design and is checked against "
             "its own equations)"))
    if not report.ok:
        print(report, file=sys.stderr)
    if args.plot:
        _plot(result.history, args.plot)
        print(f"learning curves written to {args.plot}")
    if args.plot_gradients:
        import matplotlib

        matplotlib.use("Agg")
        from fbp.telemetry import plot_gradient_flow

        plot_gradient_flow(result.telemetry, model=model).savefig(args.plot_gradients, dpi=120)
        print(f"gradient flow (per-layer output-cotangent norms) written to {args.plot_gradients}")
    if args.dashboard:
        from fbp import diagnostics

        diagnostics.plot(result, args.dashboard)
        print(f"diagnostics dashboard ({args.diagnostics}, every step) written to {args.dashboard}")
        for finding in diagnostics.findings(result.diagnostics):
            print(f"finding [{finding.name}]: {finding.message}   [rule: {finding.rule}]")
    if result.diverged:
        print(f"verdict: diverged at epoch {result.diverged_at} ({result.stop_reason}); the figures above are for "
              f"the params before it. Try a smaller --lr.", file=sys.stderr)
        return 1
    print(f"verdict: {'PASS' if report.ok else 'FAIL: the gradient check failed (report above)'}")
    return 0 if report.ok else 1


def _plot(history, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in ("loss", "val_loss"):
        if name in history:
            axes[0].plot(range(1, len(history[name]) + 1), history[name], label=name)
    for name in ("accuracy", "val_accuracy"):
        if name in history:
            axes[1].plot(range(1, len(history[name]) + 1), history[name], label=name)
    for ax, title in zip(axes, ("loss", "accuracy"), strict=False):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fbp", description="fbp: functional backpropagation for JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    p_check = sub.add_parser("check", formatter_class=defaults,
                             help="verify every built-in backward rule against JAX's grad and finite differences")
    p_check.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p_check.add_argument("--jit", action="store_true", help="run fbp's rules under jax.jit")
    p_check.add_argument("-v", "--verbose", action="store_true", help="print every comparison, not only failures")
    p_check.set_defaults(run=_check)
    p_train = sub.add_parser("train", formatter_class=defaults,
                             help="train an MLP on the bundled digits, then verify its gradients")
    p_train.add_argument("--hidden", type=_int_at_least(1), nargs="+", default=[128], help="hidden layer widths")
    p_train.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    p_train.add_argument("--loss", choices=sorted(LOSSES), default="cce")
    p_train.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p_train.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate")
    p_train.add_argument("--batch-size", type=_int_at_least(0), default=32,
                         help="0 = the whole training set (batch GD)")
    p_train.add_argument("--epochs", type=_int_at_least(1), default=40)
    p_train.add_argument("--patience", type=_int_at_least(0), default=8,
                         help="early-stopping patience on val_loss; 0 = off")
    p_train.add_argument("--seed", type=_int_at_least(0), default=0)
    p_train.add_argument("--plot", metavar="PATH", type=_writable_png, help="write learning curves to this PNG")
    p_train.add_argument("--plot-gradients", metavar="PATH", type=_writable_png,
                         help="record per-layer telemetry and plot gradient flow (d_out_norm per layer) to this PNG")
    p_train.add_argument("--rule", choices=("bp", "fa", "usf", "dfa"), default="bp",
                         help="credit assignment: backpropagation, feedback alignment, sign symmetry, direct FA")
    p_train.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default="float32",
                         help="the dtype layers compute in (params stay float32; fbp.precision)")
    p_train.add_argument("--dashboard", metavar="PATH", type=_writable_png,
                         help="record training diagnostics inside the jitted step (fbp.diagnostics), draw their "
                              "dashboard to this PNG and print the findings")
    p_train.add_argument("--diagnostics", choices=("economy", "business", "full"), default="full",
                         help="the diagnostics preset for --dashboard")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.set_defaults(run=_train)
    args = parser.parse_args(argv)
    if getattr(args, "plot_gradients", None) and args.precision != "float32":
        parser.error(f"--plot-gradients records telemetry, which runs in float32: it cannot be combined with "
                     f"--precision {args.precision}")
    if getattr(args, "dashboard", None) and (args.plot_gradients or args.precision != "float32"):
        parser.error("--dashboard records diagnostics in float32 from the step's own pass: it cannot be combined with "
                     "--plot-gradients (telemetry) or --precision other than float32")
    if getattr(args, "batch_size", None) == 0:
        args.batch_size = None
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
