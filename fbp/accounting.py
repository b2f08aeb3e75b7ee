"""Privacy accounting for DP-SGD with Poisson sampling, by Google's ``dp-accounting``.

One DP-SGD step with sampling rate ``q`` (each example joins the batch with probability ``q``)
and noise multiplier ``σ`` is a Poisson-subsampled Gaussian mechanism; ``steps`` of them compose.
``epsilon`` returns the ``ε`` of that composition at a given ``δ``, by Rényi-DP ("rdp", the
moments accountant of Abadi et al., 2016, with Mironov's conversion) or by privacy-loss
distributions ("pld", tighter); ``calibrate_noise`` finds the smallest ``σ`` that reaches a
target ``ε``. ``dp-accounting`` is an optional extra: ``pip install -e ".[privacy]"``.

References:
    Mironov, "Rényi Differential Privacy", CSF 2017. Mironov, Talwar & Zhang, "Rényi Differential
    Privacy of the Sampled Gaussian Mechanism", 2019. Koskela, Jälkö & Honkela, "Computing Tight
    Differential Privacy Guarantees Using FFT", AISTATS 2020.
"""

from __future__ import annotations

import contextlib
import logging
import math

from fbp.validation import require_number, typed_arguments

ACCOUNTANTS = ("rdp", "pld")


def _library():
    try:
        import dp_accounting
    except ImportError as err:  # pragma: no cover - the privacy extra is installed with the tests
        raise ImportError("privacy accounting needs Google's dp-accounting: pip install -e \".[privacy]\"") from err
    return dp_accounting


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs (absl) every fractional Rényi order it cannot evaluate at small σ and
    then leaves out — while composing the events and while converting to ε; the result is still
    a valid bound. Keep those lines out of the user's output (absl's own verbosity and Python's
    ``absl`` logger both), and restore both afterwards."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    absl_logging = None
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging
    verbosity = absl_logging.get_verbosity() if absl_logging is not None else None
    if absl_logging is not None:
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if absl_logging is not None:
            absl_logging.set_verbosity(verbosity)


def _check(sample_rate, steps, delta, accountant, dataset_size=None):
    require_number("accounting", "sample_rate", sample_rate, low=0, low_open=True, high=1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"accounting: steps must be an int >= 0, got {steps!r}")
    require_number("accounting", "delta", delta, low=0, low_open=True, high=1, high_open=True)
    if not isinstance(accountant, str) or accountant not in ACCOUNTANTS:
        raise ValueError(f"accounting: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if dataset_size is not None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"accounting: dataset_size must be an int >= 1 (or None for Poisson sampling), got "
                             f"{dataset_size!r}")
        if round(sample_rate * dataset_size) < 1:
            raise ValueError(f"accounting: a batch of sample_rate * dataset_size = {sample_rate * dataset_size:.3g} "
                             f"examples rounds to none; raise sample_rate or dataset_size")
        if accountant != "rdp":  # dp-accounting's PLD does not support sampling without replacement
            raise ValueError(f"accounting: fixed-size batches (dataset_size given) are accounted by 'rdp' only; "
                             f"got accountant={accountant!r}")


def _event(dp, noise_multiplier, sample_rate, steps, dataset_size=None):
    gaussian = dp.GaussianDpEvent(noise_multiplier)
    if dataset_size is None:
        sampled = dp.PoissonSampledDpEvent(sample_rate, gaussian)
    else:  # a fixed-size batch drawn without replacement
        sampled = dp.SampledWithoutReplacementDpEvent(dataset_size, max(1, round(sample_rate * dataset_size)),
                                                      gaussian)
    return dp.SelfComposedDpEvent(sampled, steps)


def _fresh(dp, accountant, replace_one=False):
    if replace_one:  # fixed-size batches: neighbouring data sets differ by replacing one example
        return dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    return dp.rdp.RdpAccountant() if accountant == "rdp" else dp.pld.PLDAccountant()


@typed_arguments
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *, accountant: str = "rdp",
            dataset_size: int | None = None) -> float:
    """``ε`` after ``steps`` DP-SGD steps with noise multiplier ``σ`` and Poisson sampling rate ``q``,
    at ``δ``; ``inf`` without noise. With ``dataset_size``: batches of ``q · dataset_size``
    examples drawn without replacement instead, with "replace one" neighbouring data sets (RDP
    only; ``fit``'s ``sampling="fixed"``).

    Args:
        noise_multiplier: ``σ``.
        sample_rate: ``q``, the probability each example is in a batch.
        steps: the number of DP-SGD steps.
        delta: ``δ``.
        accountant: ``"rdp"`` (default) or ``"pld"`` (dp-accounting's).
        dataset_size: for batches of fixed size drawn without replacement (RDP only).

    Returns:
        ``ε`` (a float; ``0`` after no steps, ``inf`` when ``σ = 0``).

    Raises:
        ValueError: a value out of range, an unknown accountant, or ``"pld"`` with
            ``dataset_size`` (dp-accounting's PLD has no sampling without replacement).
    """
    _check(sample_rate, steps, delta, accountant, dataset_size)
    sigma = require_number("epsilon", "noise_multiplier", noise_multiplier, low=0)
    if steps == 0:  # nothing released yet
        return 0.0
    if sigma == 0:
        return math.inf
    dp = _library()
    acc = _fresh(dp, accountant, replace_one=dataset_size is not None)
    with _quiet():
        acc.compose(_event(dp, sigma, sample_rate, steps, dataset_size))
        return float(acc.get_epsilon(delta))


@typed_arguments
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, *,
                    accountant: str = "rdp") -> float:
    """The smallest noise multiplier ``σ`` with ``epsilon(σ, q, steps, δ) <= target_epsilon``.

    Args:
        target_epsilon: the budget ``ε``.
        delta: ``δ``.
        sample_rate: ``q``.
        steps: the number of steps.
        accountant: ``"rdp"`` or ``"pld"``.

    Returns:
        ``σ``, a float (``0`` for no steps: nothing is released).
    """
    _check(sample_rate, steps, delta, accountant)
    require_number("calibrate_noise", "target_epsilon", target_epsilon, low=0, low_open=True)
    if steps == 0:
        return 0.0
    dp = _library()
    with _quiet():
        return float(dp.calibrate_dp_mechanism(lambda: _fresh(dp, accountant),
                                               lambda sigma: _event(dp, sigma, sample_rate, steps),
                                               target_epsilon, delta))
