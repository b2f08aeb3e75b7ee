"""fbp.xla_cpu: the one XLA flag ``import fbp`` sets, when it sets it, and that it takes effect."""

import os
import platform
import subprocess
import sys

import pytest

from fbp import xla_cpu


def test_the_flag_is_appended_only_when_nothing_says_otherwise(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply(env) and env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.FLAG}"
    assert not xla_cpu.apply(env) and env["XLA_FLAGS"].count(xla_cpu.FLAG) == 1  # applied once
    empty = {}
    assert xla_cpu.apply(empty) and empty["XLA_FLAGS"] == xla_cpu.FLAG
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}  # the user's own YNNPACK setting wins
    assert not xla_cpu.apply(mine) and mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    out = {xla_cpu.OPT_OUT: "0"}
    assert not xla_cpu.apply(out) and "XLA_FLAGS" not in out
    for version in ((0, 9), (0, 12), (1, 0)):  # outside the measured versions: an unknown flag would abort XLA
        monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda v=version: v)
        assert not xla_cpu.apply({})


def _run(code, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)} | env
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.skipif(not xla_cpu.SUPPORTED[0] <= xla_cpu._jaxlib_version() < xla_cpu.SUPPORTED[1],
                    reason="jaxlib outside the versions the flag was measured on")
def test_import_fbp_takes_convolutions_off_ynnpack_and_the_opt_out_keeps_them():
    code = ("import fbp\nfrom jax._src import xla_bridge\n"
            "print(xla_bridge.backends_are_initialized(), fbp.xla_cpu.active())")
    # importing fbp creates no backend (so the flag can still act), and the flag acts
    assert _run(code) == ["False", "True"]
    initialized, active = _run(code, **{xla_cpu.OPT_OUT: "0"})
    assert initialized == "False"
    if platform.machine() in ("x86_64", "AMD64"):  # where jaxlib 0.10-0.11 route convolutions to YNNPACK
        assert active == "False"  # YNNPACK's convolution, as without fbp: so the check above is not vacuous
