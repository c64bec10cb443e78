"""Rockchip NPUs as a target: rknn-toolkit2 compiles the QDQ file into a ``.rknn`` model and runs it in its simulator.

The QDQ file already holds the QAT model's integer grids, so the toolkit builds it with ``do_quantization=False``
and needs no calibration data: it takes each Q/DQ pair's scale and zero point as the tensor's quantization (its
log: weights and biases ``asym -> sym`` because their zero points are 0, every layer INT8 on the NPU). The toolkit
runs in its own Python (:mod:`qatkit.targets.rknn_env`), driven through :mod:`qatkit.targets.rknn_worker`.

What :func:`qatkit.verify` reads here, as from the other runtimes: model outputs in graph order, and for each
activation QuantizeLinear output it exposes, that tensor's integer codes (how, in :mod:`qatkit.targets.rknn_graph`).
The simulator compiles a fixed batch: a symbolic batch is built at 1 and larger batches run image by image.

Known limit, measured (docs/targets.md): the simulator is not bit-exact with integer arithmetic (on resnet18's first
conv, ORT matches an exact integer reference and the simulator is one code off on 17 % of values), so layer-wise
agreement here is within one step for nearly all values, not all.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx

from ..errors import QatkitError
from . import rknn_env
from .base import GraphRuntime
from .rknn_graph import Codes, expose_quantize_inputs, fix_batch

PLATFORMS = ("rk3562", "rk3566", "rk3568", "rk3576", "rk3588", "rv1103", "rv1103b", "rv1106", "rv1106b", "rv1126b",
             "rk2118")
WORKER = Path(__file__).with_name("rknn_worker.py")
# Graph rules of the toolkit turned off for every build. Its attention fusion (MatMul, Add, Mul, Softmax, MatMul into
# one SDPA op) fails with an IndexError on a QDQ attention block (YOLO11's C2PSA), and its message names this switch.
DISABLED_RULES = ["fuse_exmatmul_add_mul_exsoftmax13_exmatmul_to_sdpa"]


class _Worker:
    """One rknn-toolkit2 process: JSON requests in, JSON replies out, its log in ``folder/rknn.log``."""

    def __init__(self, folder: Path) -> None:
        self.log = folder / "rknn.log"
        python = rknn_env.toolkit_python()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, cwd=folder, text=True)

    def request(self, **request) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        reply = json.loads(line) if line else {"ok": False, "error": f"the toolkit's process ended (exit code "
                                                                         f"{self.proc.poll()})"}
        if not reply["ok"]:
            raise QatkitError(f"rknn-toolkit2 {request['op']}: {reply['error']}. Its log ends:\n{self._tail()}")
        return reply

    def _tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []
        errors = [t for t in text if t.startswith(("E ", "E RKNN"))]
        return "\n".join((errors or text)[-lines:])

    def close(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


class Rknn(GraphRuntime):
    """An ONNX file compiled by rknn-toolkit2 for ``platform`` and run in the toolkit's PC simulator.

    Example:
        >>> rt = Rknn("model.qdq.onnx", platform="rk3588")   # compiled and loaded in the simulator
        >>> outputs = rt.run({rt.input_names[0]: np.zeros((1, 3, 320, 320), np.float32)})

    The simulator cannot run a saved ``.rknn`` file (the toolkit refuses: "use load_xxx & build"), so each
    instance builds from the ONNX file; :func:`compile_rknn` writes the file a board runs.
    """

    name = "rknn"

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "f32",
                 platform: str = "rk3588") -> None:
        super().__init__(path, threads=threads, precision=precision)
        check_platform(platform)
        model = onnx.load(str(path))
        self._read_names(model.graph)
        self._batch = fix_batch(model)
        self._plan = expose_quantize_inputs(model)
        self._exposed = len(model.graph.output)
        self._folder = tempfile.TemporaryDirectory(prefix="qatkit-rknn-")
        built = Path(self._folder.name) / "model.onnx"
        onnx.save(model, str(built))
        self._worker = _Worker(Path(self._folder.name))
        self._finalizer = weakref.finalize(self, _close, self._worker, self._folder)
        self._worker.request(op="build", onnx=str(built), platform=platform, rknn=None, simulate=True,
                             disable_rules=DISABLED_RULES)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(feed[name], dtype=np.float32) for name in self._inputs]
        n = len(arrays[0]) if arrays and arrays[0].ndim else 1
        if self._batch is not None and n != self._batch:
            raise QatkitError(f"{self.path} was exported with batch {self._batch} and got {n} images: export it with "
                              "a symbolic batch (the default) or feed that many")
        step = self._batch or 1
        parts = [self._run_once([a[i:i + step] for a in arrays]) for i in range(0, n, step)]
        return [np.concatenate(outs) if len(parts) > 1 else outs[0] for outs in zip(*parts)]

    def _run_once(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        folder = Path(self._folder.name)
        np.savez(folder / "in.npz", *arrays)
        self._worker.request(op="run", inputs=str(folder / "in.npz"), outputs=str(folder / "out.npz"))
        with np.load(folder / "out.npz") as data:
            got = [data[f"arr_{i}"] for i in range(len(data.files))]
        if len(got) != self._exposed:
            raise QatkitError(f"rknn-toolkit2 returned {len(got)} outputs for the {self._exposed} tensors {self.path} "
                              "exposes: it merged some of them (qatkit.targets.rknn_graph); please report it with "
                              "the model")
        return [got[p] if isinstance(p, int) else p.of(arrays[p.source] if p.from_input else got[p.source])
                for p in self._plan]

    def close(self) -> None:
        """Stop the toolkit's process (also done when the object is collected)."""
        self._finalizer()


def _close(worker: _Worker, folder: tempfile.TemporaryDirectory) -> None:
    worker.close()
    folder.cleanup()


def check_platform(platform: str) -> None:
    """Raise a QatkitError listing the valid chips unless ``platform`` is one of ``PLATFORMS``."""
    if platform not in PLATFORMS:
        raise QatkitError(f"unknown rknn platform {platform!r}; rknn-toolkit2 2.5 targets: {', '.join(PLATFORMS)}")


def compile_rknn(onnx_path: str | Path, rknn_path: str | Path, *, platform: str = "rk3588") -> Path:
    """Compile a QDQ ONNX file (a qatkit export) into a ``.rknn`` model for a Rockchip NPU, with no calibration data:
    the toolkit keeps the file's Q/DQ scales (module docstring).

    Args:
        onnx_path: the QDQ ONNX file (a symbolic batch is compiled at batch 1).
        rknn_path: the ``.rknn`` file to write.
        platform: the chip (``PLATFORMS``), e.g. ``"rk3588"``.

    Returns:
        ``rknn_path``.

    Raises:
        QatkitError: unknown platform, toolkit not installed (names the install command), or the toolkit refused
            the model (with the end of its log).

    Example:
        >>> compile_rknn("runs/demo/model.qdq.onnx", "runs/demo/model.rknn", platform="rk3588")
    """
    check_platform(platform)
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist: run `qatkit export` first")
    rknn_path = Path(rknn_path).resolve()
    rknn_path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(onnx_path))
    fix_batch(model)
    expose_quantize_inputs(model)  # outputs the toolkit can build (qatkit.targets.rknn_graph)
    with tempfile.TemporaryDirectory(prefix="qatkit-rknn-") as tmp:
        onnx.save(model, str(Path(tmp) / "model.onnx"))
        worker = _Worker(Path(tmp))
        try:
            worker.request(op="build", onnx=str(Path(tmp) / "model.onnx"), platform=platform, rknn=str(rknn_path),
                           simulate=False, disable_rules=DISABLED_RULES)
        finally:
            worker.close()
    return rknn_path
