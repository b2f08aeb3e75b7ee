"""Early stopping: when to stop training because a monitored metric stopped improving."""

from __future__ import annotations

import dataclasses
import math

from fbp.validation import check_fields, require_number

MODES = ("auto", "min", "max")


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    A non-finite value is never an improvement. ``fit`` checks ``monitor`` against the metrics it
    will record before it trains.

    Args:
        monitor: the metric to watch (``"val_loss"``, ``"accuracy"``, ...).
        patience: epochs without improvement before stopping.
        min_delta: the least change that counts as an improvement.
        mode: ``"auto"`` maximises metrics named ``*accuracy`` and minimises the rest; ``"min"``
            and ``"max"`` say it outright.
        restore_best: return the params of the best epoch.
    """

    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    mode: str = "auto"
    restore_best: bool = True

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.monitor, str):
            raise TypeError(f"EarlyStopping: monitor must be a metric name such as 'val_loss', got {self.monitor!r}")
        if self.mode not in MODES:
            raise ValueError(f"EarlyStopping: mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"EarlyStopping: patience must be an int >= 1 (epochs without improvement), "
                             f"got {self.patience!r}")
        require_number("EarlyStopping", "min_delta", self.min_delta, low=0.0)

    @property
    def maximise(self) -> bool:
        return self.mode == "max" or (self.mode == "auto" and self.monitor.endswith("accuracy"))

    def better(self, value: float, best: float) -> bool:
        if not math.isfinite(value):
            return False
        return value > best + self.min_delta if self.maximise else value < best - self.min_delta
