"""qatkit: quantization-aware training for PyTorch vision models, with a verified INT8 ONNX at the end.

    import qatkit
    qm = qatkit.quantize(model, recipe="onnxruntime", example_inputs=(x,))   # no model edits
    qatkit.calibrate(qm, batches, method="mse")                              # PTQ
    qatkit.correct_bias(qm, batches[:8])                                     # optional: bias correction
    ...train qm with your own loop...                                        # QAT
    qatkit.export_onnx(qm, (x,), "model.qdq.onnx")                           # QDQ ONNX
    report = qatkit.verify(qm, "model.qdq.onnx", batches)                    # ORT vs PyTorch
    qatkit.save(qm, "ckpt.pt"); qm2 = qatkit.load(model_factory, "ckpt.pt")
"""
from __future__ import annotations

import os

# On small shared CPUs, OpenMP threads that spin-wait collapse throughput when another process runs
# (measured: 20x slower steps). Passive waiting costs nothing measurable alone. Only a default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .adapters import DetectorCore  # noqa: E402
from .calibrate import CalibrationReport, calibrate, uncalibrated  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .errors import (CheckpointError, DataError, NotCalibratedError, QatkitError, QatkitWarning,  # noqa: E402
                     RecipeError)
from .export import export_onnx  # noqa: E402
from .encodings import export_encodings, qdq_from_encodings  # noqa: E402
from .ptq import BiasCorrectionReport, correct_bias  # noqa: E402
from .quant.quantizer import FakeQuantizer  # noqa: E402
from .quant.scheme import QuantScheme  # noqa: E402
from .quantize import capture, freeze, quantization_state, quantize  # noqa: E402
from .recipes import Recipe, builtin_recipes, load_recipe  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "quantize", "calibrate", "export_onnx", "export_encodings", "qdq_from_encodings", "verify", "save", "load",
    "capture", "quantization_state", "uncalibrated", "freeze", "correct_bias", "BiasCorrectionReport",
    "Recipe", "load_recipe", "builtin_recipes", "QuantScheme", "FakeQuantizer",
    "CalibrationReport", "VerifyReport", "DetectorCore",
    "QatkitError", "RecipeError", "DataError", "NotCalibratedError", "CheckpointError", "QatkitWarning",
]
