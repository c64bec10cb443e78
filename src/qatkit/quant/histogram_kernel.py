"""One pass over an observed tensor for the histogram calibrators: bin counts, extremes and a NaN check together.

Calibration used to read every observed tensor twice (``aminmax``, the compiled bin index), write an int32 bin
index and read that three times (``bincount``'s two checks and its count). ``histogram_kernel.c`` does it in one
read: the bin index of each block of values, vectorized (AVX2 where the CPU has it, else SSE2), into a small
buffer, counted into four sub-histograms that stay in the L1 cache, with the block's min, max and NaN flag. The
bin index is histc's float32 arithmetic in histc's order, so the counts equal
:func:`qatkit.quant.histogram.bin_counts` bit for bit (tests/test_histogram_kernel.py).

The C file is compiled once per machine with the system's C compiler (the one inductor's kernels need anyway) into
a cache folder (``QATKIT_CACHE_DIR``, else ``<tmp>/qatkit-<uid>``), keyed by the source, the compiler and the
platform, and loaded with ctypes, which releases the GIL during the call: a large tensor is split between torch's
threads. Without a compiler, or with ``QATKIT_FUSED_FAKE_QUANT=0``, :func:`fused_bin_counts` returns None and the
histogram uses torch's ops (the same counts).

Example:
    >>> out = fused_bin_counts(torch.rand(1 << 16), 0.0, 1.0, 2048, False)
    >>> out is None or int(out[0].sum()) == 1 << 16
    True
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import QatkitWarning

SOURCE = Path(__file__).with_name("histogram_kernel.c")
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
SPLIT_MIN_NUMEL = 1 << 20  # below this one call in the calling thread (a thread hand-off costs ~20-50 us)


def _cache_dir() -> Path:
    root = os.environ.get("QATKIT_CACHE_DIR")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(root) if root else Path(tempfile.gettempdir()) / f"qatkit-{uid}"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> Path:
    """The compiled library, built on first use (atomically: parallel processes may build it at once)."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(source + repr((version, FLAGS, platform.machine(), platform.system())).encode())
    target = _cache_dir() / f"histogram_kernel-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{Path(cc).name} failed: {(done.stderr or done.stdout).strip()[:300]}")
    tmp.replace(target)
    return target


class _Library:
    """The loaded kernel, its argument types, and the threads that split large tensors between them."""

    def __init__(self) -> None:
        self.fn = None
        self.tried = False
        self.pool: ThreadPoolExecutor | None = None
        self.workers = 0
        self.lock = threading.Lock()

    def load(self):
        with self.lock:
            if self.tried:
                return self.fn
            self.tried = True
            setting = os.environ.get("QATKIT_FUSED_FAKE_QUANT", "1")
            if setting == "0":
                return None
            try:
                fn = ctypes.CDLL(str(_build())).qatkit_bin_counts
            except (OSError, AttributeError) as e:
                warnings.warn(f"qatkit: the histogram kernel could not be built ({e}); calibration uses torch's "
                              "ops instead (the same counts, slower). Install a C compiler (gcc) to speed it up",
                              QatkitWarning, stacklevel=3)
                return None
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int32,
                           ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            self.fn = fn
            return fn

    def executor(self) -> ThreadPoolExecutor:
        """One pool of torch's thread count (made again only when that changes; the old one is shut down)."""
        threads = torch.get_num_threads()
        if self.pool is None or self.workers != threads:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            self.pool, self.workers = ThreadPoolExecutor(threads, thread_name_prefix="qatkit-histogram"), threads
        return self.pool


_LIB = _Library()


def fused_bin_counts(x: torch.Tensor, lo: float, hi: float, bins: int,
                     absolute: bool) -> tuple[torch.Tensor, float, float, bool] | None:
    """Histogram of ``x`` (``|x|`` if ``absolute``) over ``[lo, hi]`` in ``bins`` bins, and ``x``'s min, max and
    whether it holds a NaN, from one read of ``x``; None where the kernel does not apply (not a contiguous float32
    CPU tensor, no compiler, or turned off).

    The counts (int64) equal ``torch.histc``'s for values in ``[lo, hi]``; a value outside lands in an end bin, so
    keep the counts only if min and max lie inside (and there is no NaN).

    Args:
        x: the observed values.
        lo, hi: the histogram range (float32 values), ``lo < hi``.
        bins: number of equal-width bins.
        absolute: count ``|x|``.

    Example:
        >>> counts, lo, hi, nan = fused_bin_counts(torch.tensor([0.0, 0.5, 1.0]), 0.0, 1.0, 2, False)
        >>> counts.tolist(), lo, hi, nan
        ([1, 2], 0.0, 1.0, False)
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or not hi > lo:
        return None
    fn = _LIB.fn if _LIB.tried else _LIB.load()
    if fn is None:
        return None
    n = x.numel()
    parts = max(1, min(torch.get_num_threads(), n // SPLIT_MIN_NUMEL))
    counts = torch.zeros(parts, bins, dtype=torch.int64)
    extremes = (ctypes.c_float * (2 * parts))()  # ctypes buffers: reading them back costs no tensor op
    nan = (ctypes.c_int32 * parts)()
    step = -(-n // parts)
    base, counts_at, row = x.data_ptr(), counts.data_ptr(), 8 * bins
    extremes_at, nan_at = ctypes.addressof(extremes), ctypes.addressof(nan)

    def run(part: int) -> int:
        start = part * step
        size = max(0, min(n, start + step) - start)
        return fn(base + 4 * start, size, lo, hi, bins, int(absolute), counts_at + row * part,
                  extremes_at + 8 * part, nan_at + 4 * part)

    status = [run(0)] if parts == 1 else list(_LIB.executor().map(run, range(parts)))
    if any(status):
        raise MemoryError("qatkit histogram kernel: could not allocate its sub-histograms")
    total = counts[0] if parts == 1 else counts.sum(0)
    return total, min(extremes[0::2]), max(extremes[1::2]), any(nan)
