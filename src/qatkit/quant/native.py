"""qatkit's C kernels: built once per machine with the system C compiler, loaded with ctypes.

A kernel that inductor does not generate well (a histogram with per-thread bins, a weight gradient with its
per-channel sum in the same pass, a table lookup by a quantized input's code) is a small C file next to the module
that calls it. It is compiled once per
machine with the system's C compiler (the one inductor's kernels need anyway) into a cache folder
(``QATKIT_CACHE_DIR``, else ``<tmp>/qatkit-<uid>``), keyed by the source, the compiler, the flags and the platform,
and loaded with ctypes, which releases the GIL during the call: large tensors can be split between torch's threads
(:meth:`NativeKernel.executor`). Without a compiler, or with ``QATKIT_FUSED_FAKE_QUANT=0``, :meth:`NativeKernel.load`
returns None and the caller uses torch's ops (the same results).

Example:
    >>> from pathlib import Path
    >>> kernel = NativeKernel(Path(__file__).with_name("histogram_kernel.c"), "qatkit_bin_counts", [], "the test")
    >>> kernel.load() is None or callable(kernel.load())
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import QatkitWarning

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


def build(source: Path) -> Path:
    """The compiled library of ``source``, built on first use (atomically: parallel processes may build it at
    once).

    Args:
        source: a C file (C99, no unsafe-math flags: :data:`FLAGS`).

    Example:
        >>> build(Path(__file__).with_name("histogram_kernel.c")).suffix  # doctest: +SKIP
        '.so'
    """
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    text = source.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(text + repr((version, FLAGS, platform.machine(), platform.system())).encode())
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    done = subprocess.run([cc, *FLAGS, str(source), "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{Path(cc).name} failed: {(done.stderr or done.stdout).strip()[:300]}")
    tmp.replace(target)
    return target


class NativeKernel:
    """One C function of one source file: built and loaded on first use, and the threads that split large
    tensors between them.

    Args:
        source: the C file.
        symbol: the function's name in it.
        argtypes: its ctypes argument types (it returns an int: 0 for success).
        fallback: what the caller does without it, for the warning ("calibration uses torch's ops instead").
    """

    def __init__(self, source: Path, symbol: str, argtypes: list, fallback: str) -> None:
        self.source, self.symbol, self.argtypes, self.fallback = source, symbol, argtypes, fallback
        self.fn = None
        self.tried = False
        self.pool: ThreadPoolExecutor | None = None
        self.workers = 0
        self.lock = threading.Lock()

    def load(self):
        """The ctypes function, or None (turned off, or it could not be built: said once, with the fix)."""
        if self.tried:
            return self.fn
        with self.lock:
            if self.tried:
                return self.fn
            self.tried = True
            if os.environ.get("QATKIT_FUSED_FAKE_QUANT", "1") == "0":
                return None
            try:
                fn = getattr(ctypes.CDLL(str(build(self.source))), self.symbol)
            except (OSError, AttributeError) as e:
                warnings.warn(f"qatkit: the {self.source.stem} C kernel could not be built ({e}); {self.fallback} "
                              "(the same results, slower). Install a C compiler (gcc) to speed it up",
                              QatkitWarning, stacklevel=3)
                return None
            fn.restype = ctypes.c_int
            fn.argtypes = self.argtypes
            self.fn = fn
            return fn

    def executor(self) -> ThreadPoolExecutor:
        """One pool of torch's thread count (made again only when that changes; the old one is shut down)."""
        threads = torch.get_num_threads()
        if self.pool is None or self.workers != threads:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"qatkit-{self.source.stem}")
            self.workers = threads
        return self.pool

    def run_parts(self, part: Callable[[int], int], parts: int) -> list[int]:
        """``part(i)`` for ``i`` in ``range(parts)``: the first in the calling thread, the others in the pool
        (ctypes releases the GIL, so they run at once). Returns their results in order."""
        if parts == 1:
            return [part(0)]
        futures = [self.executor().submit(part, i) for i in range(1, parts)]
        return [part(0)] + [f.result() for f in futures]
