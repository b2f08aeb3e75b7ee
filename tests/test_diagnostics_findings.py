"""The findings' rules on made-up records (each fires at its threshold and not below), and the
dashboard drawn from a record with and without every panel's quantities."""

import numpy as np
import pytest

from fbp.diagnostics import findings, plot


def _record(steps=50, **values):
    return {s: {k: (v(s) if callable(v) else v) for k, v in values.items()} for s in range(steps)}


def _names(record):
    return [f.name for f in findings(record)]


@pytest.mark.parametrize("alpha, expected", [(0.6, ["step-too-large"]), (0.4, []), (-0.6, ["step-too-small"]),
                                             (-0.4, [])])
def test_alpha_rules(alpha, expected):
    assert _names(_record(alpha=alpha, loss=1.0)) == expected


def test_a_rising_loss_with_overshooting_steps_is_too_large():
    assert _names(_record(alpha=0.2, loss=lambda s: 1.0 + s)) == ["loss-rising"]
    assert _names(_record(alpha=-0.2, loss=lambda s: 1.0 + s)) == []  # creeping steps do not make a loss rise


def test_stability_rule():
    assert _names(_record(ggn_max_eigenvalue=10.0, learning_rate=0.21)) == ["beyond-stability"]
    assert _names(_record(ggn_max_eigenvalue=10.0, learning_rate=0.19)) == []


def test_noise_scale_rules_read_the_ratio_of_means():
    # one step's ratio would be negative; the means give 2.0 / 0.01 = 200 > batch 64
    record = _record(batch=64, noise_scale=lambda s: {"trace_cov": 2.0, "grad_sq": 0.03 if s % 2 else -0.01})
    assert _names(record) == ["batch-below-noise-scale"]
    assert _names(_record(batch=640, noise_scale={"trace_cov": 1.0, "grad_sq": 0.1})) == ["batch-above-noise-scale"]
    assert _names(_record(batch=64, noise_scale={"trace_cov": 1.0, "grad_sq": 0.1})) == []
    # a step-size finding first: the noise scale's advice assumes a tuned step
    assert _names(_record(alpha=0.9, batch=640, noise_scale={"trace_cov": 1.0, "grad_sq": 0.1})) == ["step-too-large"]


def test_update_ratio_rules():
    record = _record(update_ratio={"total": 1e-3, "layers": {"0": 1e-6, "2": 0.5, "4": 1e-3}})
    assert _names(record) == ["layer-frozen", "layer-racing"]
    assert "layer 0" in findings(record)[0].message and "layer 2" in findings(record)[1].message


def test_every_finding_names_its_rule():
    record = _record(alpha=0.9, ggn_max_eigenvalue=10.0, learning_rate=1.0,
                     update_ratio={"total": 1e-3, "layers": {"0": 1e-6}})
    assert all(f.rule and f.message for f in findings(record))


def test_the_dashboard_draws_whatever_was_recorded(tmp_path):
    full = _record(alpha=lambda s: np.sin(s), loss=lambda s: 1 / (s + 1), batch=32,
                   noise_scale={"trace_cov": 1.0, "grad_sq": 0.1, "b_simple": 10.0}, norm_test=0.5, inner_test=0.2,
                   ortho_test=0.4, ggn_trace={"total": 3.0, "layers": {"0": 3.0}}, ggn_max_eigenvalue=1.0,
                   tic_diag=4.0, grad_norm={"total": 1.0, "layers": {"0": 1.0}},
                   update_ratio={"total": 1e-3, "layers": {"0": 1e-3}}, distance={"total": 1.0, "layers": {"0": 1.0}},
                   grad_hist_1d={"counts": np.ones(10), "edges": np.linspace(-1, 1, 11)},
                   grad_hist_2d={"counts": np.ones((4, 5)), "edges_grad": np.linspace(-1, 1, 5),
                                 "edges_param": np.linspace(-2, 2, 6)})
    plot(full, tmp_path / "full.png")
    plot(_record(loss=1.0), tmp_path / "bare.png")
    assert (tmp_path / "full.png").stat().st_size > 10000 and (tmp_path / "bare.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="no diagnostics"):
        plot({})


def test_tensorboard_event_file_holds_the_scalars_and_histograms(tmp_path):
    from tensorboardX.proto import event_pb2

    from fbp.diagnostics import tensorboard

    record = _record(steps=3, alpha=0.1, noise_scale={"b_simple": 5.0, "trace_cov": 1.0, "grad_sq": 0.2},
                     update_ratio={"total": 1e-3, "layers": {"0": 2e-3}},
                     grad_hist_1d={"counts": np.array([1.0, 3.0, 0.0]), "edges": np.array([-1.0, 0.0, 1.0, 2.0])})
    assert tensorboard.write(record, tmp_path) == 3 * 6
    events = []
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        i = 0
        while i < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            n = int.from_bytes(data[i:i + 8], "little")
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            events.append(event)
            i += 16 + n
    tags = {v.tag for e in events for v in e.summary.value}
    assert {"alpha", "noise_scale/b_simple", "update_ratio/layers/0", "grad_hist_1d"} <= tags
    hist = next(v.histo for e in events for v in e.summary.value if v.tag == "grad_hist_1d")
    assert list(hist.bucket) == [1.0, 3.0, 0.0] and hist.num == 4.0
    with pytest.raises(ValueError, match="no diagnostics"):
        tensorboard.write({}, tmp_path)
