"""Domain adaptation with a gradient-reversal layer (DANN, Ganin & Lempitsky, 2015) on digits.

Source domain: labelled digits. Target domain: the same kind of digits *shifted one pixel* (and
slightly noisy), and no labels. One network: a feature extractor, a label head (trained on source labels
only) and a domain head that tells source from target. With ``nn.GradientReversal`` between the
features and the domain head, the features are trained to *confuse* the domain head
(``d_x = -scale · d_y``), so they become domain-invariant and the label head transfers to the
target domain. Without it (``nn.Identity()``), the same architecture learns features that
separate the domains.

The loss is built from fbp's own rules: cross-entropy on the label logits of source examples plus
binary cross-entropy on the domain logit of every example — its backward is the two losses'
backward rules (``fbp.check.loss`` verifies it below).

Run: ``python examples/gradient_reversal.py``. Prints the target-domain test accuracy of both::

    without gradient reversal: target accuracy 0.xxx
    with gradient reversal:    target accuracy 0.xxx
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fbp import Loss, check, data, losses, nn, optim, train

CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DomainAdversarialLoss(Loss):
    """``pred``: ``(N, 11)`` = 10 label logits + 1 domain logit; ``target``: ``(N, 2)`` =
    (label, domain) with label -1 for unlabelled target-domain examples and domain 0/1.
    Value: ``(Σ_source CE + weight · Σ_all BCE) / N``."""

    weight: float = 1.0
    reduction: str = "mean"

    def forward(self, pred, target):
        labelled = (target[:, 0] >= 0).astype(pred.dtype)
        labels = jnp.where(target[:, 0] >= 0, target[:, 0], 0).astype(jnp.int32)
        ce, ce_res = losses.CategoricalCrossEntropy(from_logits=True, reduction="none").forward(
            pred[:, :CLASSES], labels)
        bce, bce_res = losses.BinaryCrossEntropy(from_logits=True, reduction="none").forward(
            pred[:, CLASSES:], target[:, 1:].astype(pred.dtype))
        n = pred.shape[0]
        return (jnp.sum(labelled * ce) + self.weight * jnp.sum(bce)) / n, (ce_res, bce_res, labelled, n)

    def backward(self, res, g=1.0):
        ce_res, bce_res, labelled, n = res
        d_labels = losses.CategoricalCrossEntropy(from_logits=True, reduction="none").backward(
            ce_res, g * labelled / n)
        d_domain = losses.BinaryCrossEntropy(from_logits=True, reduction="none").backward(
            bce_res, jnp.full(labelled.shape, self.weight * g / n, labelled.dtype))
        return jnp.concatenate([d_labels, d_domain], axis=1)


def shift(x, key):
    """The target domain: every image moved one pixel to the right (wrapping around), plus light
    Gaussian pixel noise. (Inverted images defeat this MLP with or without adaptation: the
    label-relevant structure itself changes sign.)"""
    moved = np.roll(x.reshape(-1, 8, 8), 1, axis=2).reshape(x.shape)
    return np.clip(moved + 0.05 * np.asarray(jax.random.normal(key, x.shape)), 0, 1).astype(np.float32)


def network(reverse: bool, scale: float):
    features = nn.Serial(nn.Dense(128, kernel_init=nn.init.he_normal), nn.ReLU(),
                         nn.Dense(64, kernel_init=nn.init.he_normal), nn.ReLU())
    label_head = nn.Dense(CLASSES)
    domain_head = nn.Serial(nn.GradientReversal(scale) if reverse else nn.Identity(), nn.Dense(64), nn.ReLU(),
                            nn.Dense(1))
    return nn.Serial(features, nn.Parallel(label_head, domain_head))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--scale", type=float, default=0.3, help="gradient reversal scale (lambda)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = data.load_digits(seed=args.seed)
    key = jax.random.PRNGKey(args.seed)
    half = len(ds.x_train) // 2
    x_source, y_source = ds.x_train[:half], ds.y_train[:half]
    x_target = shift(ds.x_train[half:], jax.random.fold_in(key, 1))  # its labels are never used
    x = np.concatenate([x_source, x_target])
    y = np.concatenate([np.stack([y_source, np.zeros(half)], 1),
                        np.stack([-np.ones(len(x_target)), np.ones(len(x_target))], 1)]).astype(np.float32)
    x_test_target = shift(ds.x_test, jax.random.fold_in(key, 2))
    loss = DomainAdversarialLoss()
    check.assert_loss(loss, jax.random.normal(key, (6, CLASSES + 1)), jnp.asarray(y[half - 3:half + 3]))

    results = {}
    for name, reverse in (("without gradient reversal", False), ("with gradient reversal", True)):
        model = network(reverse, args.scale)
        params = model.init(key, x)
        result = train.fit(model, loss, optim.adam(1e-3), params, x, y, key=jax.random.fold_in(key, 3),
                           epochs=args.epochs, batch_size=64, scan_epochs=True, progress=False)
        logits = model.apply(result.params, jnp.asarray(x_test_target))[:, :CLASSES]
        accuracy = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(ds.y_test)))
        print(f"{name + ':':<27}target accuracy {accuracy:.3f}", flush=True)
        results[name] = accuracy
    return results


if __name__ == "__main__":
    main()
