"""The process that runs rknn-toolkit2 for qatkit: started by :mod:`qatkit.targets.rockchip` with the toolkit's own Python.

It imports only the standard library, numpy and ``rknn.api`` (never qatkit, whose dependencies that environment does
not have). Protocol: one JSON request per line on stdin, one JSON reply per line on the original stdout; the
toolkit's own printing (Python and C) goes to stderr, which the parent keeps as the log. Arrays travel as ``.npz``
files the parent names.

Requests:
    ``{"op": "build", "onnx": path, "platform": "rk3588", "rknn": path | null, "simulate": true, "disable_rules": []}``:
    config (the toolkit's graph rules named there off), load_onnx, build
    without quantization (the QDQ file carries the QAT scales), export the .rknn file if asked, start the simulator.
    ``{"op": "run", "inputs": npz, "outputs": npz}``: inference on ``arr_0..`` (float32 NCHW), outputs to ``npz``.
    ``{"op": "quit"}``.
Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": message}``.
"""
from __future__ import annotations

import json
import os
import sys
import time


def _serve(proto, requests) -> None:
    import numpy as np
    from rknn.api import RKNN

    rknn = None
    for line in requests:
        request = json.loads(line)
        op, start = request.get("op"), time.time()
        try:
            if op == "quit":
                break
            if op == "build":
                rknn = RKNN(verbose=False)
                _check(rknn.config(target_platform=request["platform"],
                                   disable_rules=request.get("disable_rules") or []), "config")
                _check(rknn.load_onnx(model=request["onnx"]), "load_onnx")
                _check(rknn.build(do_quantization=False), "build")
                if request.get("rknn"):
                    _check(rknn.export_rknn(request["rknn"]), "export_rknn")
                if request.get("simulate", True):
                    _check(rknn.init_runtime(), "init_runtime (simulator)")
                reply = {"ok": True}
            elif op == "run":
                if rknn is None:
                    raise RuntimeError("run before build")
                with np.load(request["inputs"]) as data:
                    inputs = [np.ascontiguousarray(data[f"arr_{i}"]) for i in range(len(data.files))]
                outputs = rknn.inference(inputs=inputs, data_format="nchw")
                if outputs is None:
                    raise RuntimeError("inference returned no outputs (see the log)")
                np.savez(request["outputs"], *[np.asarray(o) for o in outputs])
                reply = {"ok": True, "outputs": len(outputs)}
            else:
                raise RuntimeError(f"unknown request {op!r}")
        except Exception as e:  # reported to the parent, which raises it with the log's tail
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply["seconds"] = round(time.time() - start, 3)
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
    if rknn is not None:
        rknn.release()


def _check(ret, what: str) -> None:
    if ret != 0:
        raise RuntimeError(f"rknn-toolkit2 {what} returned {ret}")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # qatkit's modules are not the toolkit's
    proto = os.fdopen(os.dup(1), "w")  # the reply channel; everything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _serve(proto, sys.stdin)


if __name__ == "__main__":
    main()
