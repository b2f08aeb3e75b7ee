"""Keep freed host buffers in the process's heap: ``import fbp`` raises glibc malloc's mmap and
trim thresholds to 256 MiB (``mallopt``), on Linux with glibc.

**Why.** XLA's CPU runtime allocates each call's temporary buffer afresh and frees it when the
call ends. glibc serves an allocation above its mmap threshold (128 KiB at start, raised
dynamically up to 32 MiB) with a new ``mmap`` and returns it to the kernel on ``free``, and it
trims the heap's free top above its trim threshold; either way the next call's buffer is fresh
memory, and every page of it costs a page fault (the kernel maps and zeroes it) the first time
the program writes it. In one process, toggling the thresholds between 256 MiB and 32 MiB
(where glibc's dynamic rule settles), fbp's jitted SGD step on this project's 2-core CPU was
1.34–1.42× faster for ``bench_cnn.py``'s CNN (34 MiB of temporaries: 25–26 ms against 34–37),
1.15–1.24× for the LSTM and 1.20–1.23× for the transformer block of ``bench_sequence.py``, and
unchanged for the MLP and for 3C3D (``benchmarks/bench_cpu_memory.py``).

**What it costs.** Up to about 256 MiB of freed memory can stay mapped in the process (its
resident size does not fall after a transient allocation below that size), which is the point;
allocations above 256 MiB are mapped and unmapped as before. Nothing about results changes.

**When it is not applied.** With ``FBP_CPU_MALLOC=0`` in the environment; when the environment
already sets glibc's malloc (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or
``glibc.malloc`` in ``GLIBC_TUNABLES``: yours win); off Linux or without glibc. ``applied()``
says whether it was. The setting is process-wide, like ``fbp.xla_cpu``'s flag: other code in the
process gets it too. ``FBP_CPU_MALLOC=0`` restores glibc's defaults (set before ``import fbp``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

THRESHOLD = 256 << 20  # bytes: both thresholds
OPT_OUT = "FBP_CPU_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_APPLIED = [False]

__all__ = ["THRESHOLD", "OPT_OUT", "apply", "applied", "set_thresholds"]


def _glibc():
    """glibc's ``mallopt`` through ctypes, or ``None`` off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has mallopt as a no-op stub)
        return libc
    except (OSError, AttributeError):
        return None


def set_thresholds(nbytes: int, libc=None) -> bool:
    """Set glibc's mmap and trim thresholds to ``nbytes`` (``mallopt``); this also turns off
    glibc's dynamic mmap threshold. ``benchmarks/bench_cpu_memory.py`` toggles them with it.

    Args:
        nbytes: both thresholds, in bytes (glibc's defaults are 128 KiB, with the mmap one dynamic).
        libc: the C library (default: glibc through ctypes); tests pass a stand-in.

    Returns:
        Whether both were set (``False`` off Linux/glibc).
    """
    libc = _glibc() if libc is None else libc
    if libc is None:
        return False
    return all(libc.mallopt(option, ctypes.c_int(nbytes)) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))


def apply(environ=None, libc=None) -> bool:
    """Raise both thresholds to ``THRESHOLD`` unless the module docstring's conditions say not to.

    Args:
        environ: the environment to read (default ``os.environ``).
        libc: the C library (default: glibc through ctypes); tests pass a stand-in.

    Returns:
        Whether both settings were made.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1") == "0" or any(k in env for k in _USER_SETTINGS) or \
            "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return False
    done = set_thresholds(THRESHOLD, libc)
    _APPLIED[0] = _APPLIED[0] or done
    return done


def applied() -> bool:
    """Whether ``import fbp`` (or a call of ``apply``) raised the thresholds in this process.

    Returns:
        ``True`` once both settings were made.
    """
    return _APPLIED[0]
