"""fbp.cpu_memory: glibc's malloc thresholds ``import fbp`` raises, when it does, and that they act."""

import os
import subprocess
import sys

import pytest

from fbp import cpu_memory


class _Libc:
    """A stand-in C library that records ``mallopt`` calls."""

    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, option, value):
        self.calls.append((option, value.value))
        return self.result


def test_the_thresholds_are_raised_only_when_nothing_says_otherwise():
    libc = _Libc()
    assert cpu_memory.apply({}, libc)
    assert libc.calls == [(-3, cpu_memory.THRESHOLD), (-1, cpu_memory.THRESHOLD)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    for env in ({cpu_memory.OPT_OUT: "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}):  # the opt-out, and the user's own settings win
        libc = _Libc()
        assert not cpu_memory.apply(env, libc) and libc.calls == [], env
    assert cpu_memory.apply({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, _Libc())  # other tunables: applied
    assert not cpu_memory.apply({}, _Libc(result=0))  # glibc refused a value


def _resident_mib_after_free(**env):
    """A fresh process: ``import fbp``, then the resident size before and after freeing 192 MiB."""
    code = ("import fbp, numpy as np\n"
            "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
            "a = np.ones(192 * 2**20 // 8); held = rss(); del a\n"
            "print(fbp.cpu_memory.applied(), held - rss())")
    environ = {k: v for k, v in os.environ.items() if k != cpu_memory.OPT_OUT and not k.startswith("MALLOC_")} | env
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ)
    assert result.returncode == 0, result.stderr
    applied, released = result.stdout.split()
    return applied == "True", float(released)


@pytest.mark.skipif(cpu_memory._glibc() is None or os.sysconf("SC_PAGE_SIZE") != 4096, reason="Linux with glibc")
def test_import_fbp_keeps_freed_buffers_mapped_and_the_opt_out_releases_them():
    applied, released = _resident_mib_after_free()
    assert applied and released < 32, released  # the 192 MiB stay in the heap for the next call
    applied, released = _resident_mib_after_free(**{cpu_memory.OPT_OUT: "0"})
    assert not applied and released > 160, released  # glibc's default: unmapped at once (the check is not vacuous)
