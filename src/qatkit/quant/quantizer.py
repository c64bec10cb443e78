"""The fake-quantizer: PyTorch's own fake-quant ops, plus calibration state and an exact ONNX export.

Training uses ``torch.fake_quantize_per_{tensor,channel}_affine`` (straight-through gradient). Export emits
QuantizeLinear/DequantizeLinear with constant scales, and folds weights/biases to int8/int32 constants computed
by the same torch op, so the ONNX graph holds exactly the integers the trained model used.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..bn_fold import scale_weight
from ..distributed import reduce_minmax
from ..errors import DataError, NotCalibratedError
from .calibrators import Calibrator, make_calibrator
from .kernels import fake_quantize, fused_weight_fake_quant
from .qparams import CalibrationError, range_to_qparams
from .scheme import QuantScheme
from .weight_kernel import ReusedOutput


def _onnx_const(g, values: np.ndarray):
    return g.op("Constant", value_t=torch.from_numpy(np.array(values, copy=True)))  # keeps 0-d scalars 0-d


def _qparams_np(scale: torch.Tensor, zero_point: torch.Tensor | None,
                container: str = "int8") -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (float32) and zero point (of the ``container`` integer type, or None) as the graph's constants."""
    zp = None if zero_point is None else zero_point.detach().cpu().numpy().astype(np.dtype(container))
    return scale.detach().cpu().float().numpy(), zp


# The TorchScript exporter knows no 16-bit integer constants and stops at opset 20, while QuantizeLinear takes
# int16/uint16 from opset 21. So a 16-bit Q/DQ is traced as a ``qatkit::`` node holding its zero point (and weight
# codes) in int32 plus the container type; qatkit.export.int16 then rewrites it into the standard op at opset 21.
INT16_DOMAIN = "qatkit"
INT16_CONTAINERS = ("int16", "uint16")


def _zero_point_const(g, zero_point: np.ndarray):
    """(constant, op-name prefix, attributes) for a zero point: standard for 8-bit, ``qatkit::`` for 16-bit."""
    if zero_point.dtype.name in INT16_CONTAINERS:
        return (_onnx_const(g, zero_point.astype(np.int32)), f"{INT16_DOMAIN}::",
                {"container_s": zero_point.dtype.name})
    return _onnx_const(g, zero_point), "", {}


def _typed_like(value, like):
    """Give a stand-in node's output the type and shape of the float tensor it replaces (the exporter cannot
    infer them for a ``qatkit::`` node, and downstream shape inference needs them)."""
    value.setType(like.type())
    return value


class _QuantDequantExport(torch.autograd.Function):
    """Identity-shaped stand-in traced during ONNX export; its ``symbolic`` writes Q -> DQ."""

    @staticmethod
    def forward(ctx, x, y, scale, zero_point, axis, clip):  # noqa: D401 - torch API
        return y.clone()  # a fresh tensor: models with in-place ops (ReLU(inplace=True)) write into it

    @staticmethod
    def symbolic(g, x, y, scale, zero_point, axis, clip):
        s = _onnx_const(g, scale)
        z, domain, kwargs = _zero_point_const(g, zero_point)
        kwargs |= {"axis_i": axis} if scale.ndim else {}
        if clip is not None:  # grid narrower than the integer container: Q alone would saturate too late
            x = g.op("Clip", x, _onnx_const(g, np.float32(clip[0])), _onnx_const(g, np.float32(clip[1])))
        q = g.op(f"{domain}QuantizeLinear", x, s, z, **kwargs)
        return _typed_like(g.op(f"{domain}DequantizeLinear", q, s, z, **kwargs), y)


class _DequantConstExport(torch.autograd.Function):
    """DequantizeLinear of a constant integer tensor (folded weights and int32 biases)."""

    @staticmethod
    def forward(ctx, q, y, scale, zero_point, axis):
        return y.clone()

    @staticmethod
    def symbolic(g, q, y, scale, zero_point, axis):
        domain, kwargs, inputs = "", {}, [q, _onnx_const(g, scale)]
        if zero_point is not None:
            z, domain, kwargs = _zero_point_const(g, zero_point)
            inputs.append(z)
        kwargs |= {"axis_i": axis} if scale.ndim else {}
        return _typed_like(g.op(f"{domain}DequantizeLinear", *inputs, **kwargs), y)


def export_dequant_const(q_int: np.ndarray, y: torch.Tensor, scale: np.ndarray, zero_point: np.ndarray | None,
                         axis: int | None) -> torch.Tensor:
    """During export: an integer constant ``q_int`` followed by DequantizeLinear, numerically ``y``."""
    if q_int.dtype.name in INT16_CONTAINERS:  # traced as int32, narrowed by qatkit.export.int16
        q_int = q_int.astype(np.int32)
    return _DequantConstExport.apply(torch.from_numpy(q_int), y, scale, zero_point, axis if scale.ndim else None)


class FakeQuantizer(nn.Module):
    """A fake-quantizer with switches for fake-quant and observation, shareable by several tensors.

    Sharing is by object: install one ``FakeQuantizer`` at several places and they observe together and use one
    scale (what concat inputs or a max-pool's input and output need). ``dynamic`` quantizers (weights) recompute
    their range from the tensor at every call, so QAT weight updates never see a stale scale.

    The flags ``calibrated``, ``fake_quant_enabled`` and ``scale_frozen`` are buffers, so that checkpoints and DDP
    carry them, and are mirrored as Python bools that ``forward`` reads (a ``bool()`` of a tensor would split a
    ``torch.compile`` graph; a Python bool is a guard). The switch methods, :meth:`set_range` and
    ``load_state_dict`` keep both in step; code that writes a flag buffer directly calls :meth:`sync_flags` after.
    """

    fixed_range = False  # set by fix_range (a class default, so quantizers pickled before it read False)

    def __init__(self, scheme: QuantScheme, name: str = "", channels: int | None = None, dynamic: bool = False):
        super().__init__()
        self.scheme = scheme
        self.name = name
        self.dynamic = dynamic
        shape = (channels,) if scheme.per_channel and channels else ()
        if scheme.per_channel and not channels:
            raise ValueError(f"quantizer {name!r}: per-channel scheme needs the channel count")
        if scheme.scale_mode == "learned" and not dynamic:
            self.scale = nn.Parameter(torch.ones(shape))  # LSQ: trained with the weights
        else:
            self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("range_lo", torch.zeros(shape))  # the range behind scale/zero point (EMA state)
        self.register_buffer("range_hi", torch.zeros(shape))
        self.register_buffer("calibrated", torch.tensor(dynamic))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        self.register_buffer("scale_frozen", torch.tensor(False))  # freeze schedule: EMA stops, LSQ stops learning
        self._calibrated, self._fake_quant_on, self._scale_frozen = dynamic, True, False  # the buffers' mirrors
        self.observer_enabled = False
        self.calibrator: Calibrator | None = None
        self._weight_out = ReusedOutput()  # the fused weight path's output tensor, kept between steps

    # ----------------------------------------------------------------- switches
    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled.fill_(int(enabled))
        self._fake_quant_on = bool(enabled)

    def freeze_scale(self, frozen: bool = True) -> None:
        """Keep the current scale for the rest of training (EMA updates stop, a learned scale stops learning)."""
        self.scale_frozen.fill_(bool(frozen))
        self._scale_frozen = bool(frozen)
        if isinstance(self.scale, nn.Parameter):
            self.scale.requires_grad_(not frozen)

    def fix_range(self, lo: float, hi: float) -> None:
        """Give the quantizer a range known in advance, such as a sigmoid's ``[0, 1]``: it is calibrated from the
        start, calibration leaves it alone, and training keeps its scale (no EMA update, no learned scale).

        Args:
            lo, hi: the range; the scheme turns it into a scale and zero point as it does a calibrated range.

        Example:
            >>> q = FakeQuantizer(QuantScheme(bits=8, signed=False, symmetric=False), "sigmoid")
            >>> q.fix_range(0.0, 1.0)
            >>> q.is_calibrated, round(float(q.scale) * 255, 6), int(q.zero_point)
            (True, 1.0, 0)
        """
        self.set_range(torch.tensor(float(lo)), torch.tensor(float(hi)))
        self.freeze_scale()
        self.fixed_range = True

    @property
    def calibrated_from_data(self) -> bool:
        """Whether calibration sets this quantizer's range: an activation's, not a weight's (dynamic, its range
        taken from the weight at every forward) nor one fixed in advance (:meth:`fix_range`)."""
        return not (self.dynamic or self.fixed_range)

    def start_observing(self, method: str | None = None) -> None:
        """Begin collecting statistics with ``method`` (default: the scheme's calibrator); a quantizer of the
        weights (dynamic) or of a range known in advance (:meth:`fix_range`) has nothing to collect."""
        if not self.calibrated_from_data:
            return
        s = self.scheme
        method = method or s.calibrator
        options = s.calibrator_options() if method == s.calibrator else {}
        self.calibrator = make_calibrator(method, qmin=s.qmin, qmax=s.qmax, symmetric=s.symmetric,
                                          axis=s.axis if s.per_channel else None, **options)
        self.observer_enabled = True

    def stop_observing(self) -> None:
        """Turn the collected statistics into scale / zero-point; a quantizer that saw nothing is an error."""
        if self.dynamic or self.calibrator is None:
            return
        if self.calibrator.num_batches == 0:
            raise NotCalibratedError(
                f"quantizer {self.name!r} saw no data during calibration: the batches never reached it "
                "(check that calibration runs the same forward path as inference, or skip this layer in the recipe)"
            )
        self.calibrator.synchronize()
        lo, hi = self.calibrator.compute_range()
        self.set_range(lo, hi)
        self.observer_enabled = False
        self.calibrator = None

    def sync_flags(self) -> None:
        """Re-read the Python mirrors of the flag buffers (after writing a buffer directly, e.g. an EMA copy)."""
        self._calibrated = bool(self.calibrated)
        self._fake_quant_on = bool(self.fake_quant_enabled)
        self._scale_frozen = bool(self.scale_frozen)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """``load_state_dict`` (a checkpoint, an optimizer resume): the mirrors follow the loaded flags."""
        super()._load_from_state_dict(*args, **kwargs)
        self.sync_flags()

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor, *, check_finite: bool = True) -> None:
        """Set scale/zero point from the range ``[lo, hi]`` (marks the quantizer calibrated).

        ``check_finite=False`` on the per-step paths (weights' dynamic range, EMA updates) skips the NaN/Inf check,
        a device sync that would also split a ``torch.compile`` graph; calibration ranges are always checked.
        """
        s = self.scheme
        scale, zp = range_to_qparams(lo, hi, s.qmin, s.qmax, s.symmetric, check_finite=check_finite)
        self._store(scale, zp, torch.as_tensor(lo), torch.as_tensor(hi))
        if not self._calibrated:  # dynamic quantizers are calibrated from the start: no write per step
            self.calibrated.fill_(1)
            self._calibrated = True

    @torch.no_grad()
    def _store(self, scale: torch.Tensor, zp: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Copy qparams and the range behind them into the buffers.

        A weight's quantizer (dynamic: its qparams are a function of the weight, recomputed every step) takes the
        new tensors as its buffers instead, where they match them, outside ``torch.compile`` and inference mode
        (whose tensors a later ``load_state_dict`` could not copy into): four copies fewer per layer and step
        (four kernel launches on a GPU). Nothing else holds its buffers between steps: DDP broadcasts the old ones
        harmlessly, as every rank computes the same qparams from the same weights."""
        if (self.dynamic and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
                and self._takes(scale, zp, lo, hi)):
            buffers = self._buffers
            buffers["scale"], buffers["zero_point"], buffers["range_lo"], buffers["range_hi"] = scale, zp, lo, hi
            return
        self.scale.copy_(scale.reshape(self.scale.shape).float())
        self.zero_point.copy_(zp.reshape(self.zero_point.shape).int())
        self.range_lo.copy_(lo.reshape(self.range_lo.shape))
        self.range_hi.copy_(hi.reshape(self.range_hi.shape))

    def _takes(self, *values: torch.Tensor) -> bool:
        """Whether ``values`` (scale, zero point, lo, hi) can stand as the buffers themselves: their shapes, dtypes and
        device, and not views of another tensor or tensors that need gradients."""
        for value, name in zip(values, ("scale", "zero_point", "range_lo", "range_hi")):
            old = self._buffers[name]
            if (type(value) is not torch.Tensor or value.shape != old.shape or value.dtype != old.dtype
                    or value.device != old.device or value.requires_grad or value._base is not None
                    or value.is_inference()):  # (a buffer that load_state_dict could not copy into)
                return False
        return True

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor) -> None:
        """Moving-average min/max of training batches (PyTorch's MovingAverageMinMaxObserver rule)."""
        if x.numel() == 0:  # no statistics in it (the range stays; DDP ranks reduce per non-empty batch)
            return
        c = self.scheme.averaging_constant
        lo, hi = reduce_minmax(*torch.aminmax(x.detach().float()))  # DDP: every rank moves its range alike
        self.set_range(self.range_lo + c * (lo - self.range_lo), self.range_hi + c * (hi - self.range_hi),
                       check_finite=False)

    def plain(self) -> bool:
        """Whether :meth:`forward` is only the fake-quant with the stored scale: nothing observed or updated, not
        exporting, not learned (so a fused kernel may apply it instead)."""
        if (self.observer_enabled or self.dynamic or self.scheme.scale_mode == "learned"
                or torch.onnx.is_in_onnx_export() or self._ema_updating()):
            return False
        return self._fake_quant_on and self._calibrated

    def passes_through(self) -> bool:
        """Whether :meth:`forward` now returns its input as it is and records nothing (fake-quant off, nothing
        observed or updated): what only this quantizer reads need not be computed apart."""
        return not (self._fake_quant_on or self.observer_enabled or self.dynamic or self._ema_updating())

    def _ema_updating(self) -> bool:
        """Whether :meth:`forward` moves the range to each batch's (``scale_mode: ema`` in training, calibrated,
        not frozen; not while exporting, which :meth:`forward` checks itself)."""
        return self.training and self.scheme.scale_mode == "ema" and self._calibrated and not self._scale_frozen

    @property
    def is_calibrated(self) -> bool:
        """Whether the quantizer has a scale (calibrated, or dynamic)."""
        return self._calibrated

    @property
    def fake_quant_on(self) -> bool:
        """Whether ``forward`` fake-quantizes (else it passes its input through)."""
        return self._fake_quant_on

    # ----------------------------------------------------------------- forward
    def _update_dynamic(self, x: torch.Tensor) -> None:
        s = self.scheme
        with torch.no_grad():
            if s.per_channel:  # (torch.aminmax along a dim is 20x slower than these two on CPU)
                dims = [d for d in range(x.ndim) if d != s.axis % x.ndim]
                lo, hi = x.amin(dim=dims), x.amax(dim=dims)
            else:
                lo, hi = torch.aminmax(x)  # one pass, half the time of min() + max()
            self.set_range(lo, hi, check_finite=False)

    def quantize_weight(self, weight: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
        """This quantizer on a conv/linear ``weight`` times ``factor``: for a dynamic per-output-channel quantizer on
        CPU, the product, range, qparams and fake-quant in one compiled kernel; otherwise :meth:`forward` of
        :func:`qatkit.bn_fold.scale_weight`'s product.

        Args:
            weight: a conv/linear weight, output channels on axis 0.
            factor: None, or a folded BatchNorm's per-output-channel scale (:func:`qatkit.bn_fold.bn_scale`).

        Example:
            >>> wq = FakeQuantizer(QuantScheme(bits=8, signed=True, symmetric=True, per_channel=True), "w", 16,
            ...                    dynamic=True)
            >>> y = wq.quantize_weight(torch.randn(16, 8, 3, 3), torch.rand(16) + 0.5)
        """
        s = self.scheme
        if (self.dynamic and s.per_channel and s.axis % weight.ndim == 0 and s.scale_mode != "learned"
                and not self.observer_enabled and not torch.onnx.is_in_onnx_export() and self._fake_quant_on):
            fused = fused_weight_fake_quant(weight, s.qmin, s.qmax, s.symmetric, factor,
                                            getattr(self, "_weight_out", None))  # (None: pickled before it)
            if fused is not None:
                y, scale, zp, lo, hi = fused  # (not checked for NaN per step: see set_range)
                self._store(scale, zp, lo, hi)
                return y
        return self(weight if factor is None else scale_weight(weight, factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exporting = torch.onnx.is_in_onnx_export()
        if self.observer_enabled and self.calibrator is not None:
            try:
                self.calibrator.observe(x.detach())
            except CalibrationError as e:
                raise DataError(f"quantizer {self.name!r}: {e}") from e
        if self.dynamic and not exporting:
            self._update_dynamic(x)
        elif self._ema_updating() and not exporting:
            self._ema_update(x)
        if not self._fake_quant_on:
            return x
        if not self.is_calibrated:
            raise NotCalibratedError(
                f"quantizer {self.name!r} has no scale yet: run qatkit.calibrate(model, batches) first"
            )
        s = self.scheme
        axis = s.axis % x.ndim if s.per_channel else None
        if exporting:  # no torch fake-quant op in the trace: the ONNX exporter rejects narrow grids
            sc, zp = _qparams_np(self.scale, self.zero_point, s.container)
            if self.dynamic:  # a constant (weight): store its integer codes, emit DequantizeLinear only
                q = self.codes(x).astype(zp.dtype)
                return export_dequant_const(q, x, sc, zp, axis)
            return _QuantDequantExport.apply(x, x, sc, zp, axis, self._export_clip(sc, zp))
        if s.scale_mode == "learned" and not self.dynamic:
            return self._learned(x, axis)
        return fake_quantize(x, self.scale, self.zero_point, s.qmin, s.qmax, axis)

    def _learned(self, x: torch.Tensor, axis: int | None) -> torch.Tensor:
        """LSQ: PyTorch's learnable fake-quant op, gradient scaled by 1/sqrt(N * qmax) as in the LSQ paper."""
        s = self.scheme
        grad_factor = 1.0 / math.sqrt(max(x[0].numel(), 1) * s.qmax)
        scale, zp = self.scale.clamp_min(1e-8), self.zero_point.float()
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, scale.reshape(1), zp.reshape(1), s.qmin,
                                                                    s.qmax, grad_factor)
        return torch._fake_quantize_learnable_per_channel_affine(x, scale, zp, axis, s.qmin, s.qmax, grad_factor)

    def _export_clip(self, scale: np.ndarray, zp: np.ndarray) -> tuple[float, float] | None:
        """Real-valued clip range for grids narrower than the ONNX container (per-tensor only)."""
        s = self.scheme
        if (s.qmin, s.qmax) == s.container_range:
            return None
        if scale.ndim:
            raise NotImplementedError(f"quantizer {self.name!r}: per-channel activations narrower than their "
                                      f"{s.container} container")
        z = float(zp.astype(np.int64))
        return (float(s.qmin) - z) * float(scale), (float(s.qmax) - z) * float(scale)

    def codes(self, x: torch.Tensor) -> np.ndarray:
        """Integer codes of ``x`` as PyTorch's fake-quant kernel computes them (``x * (1/scale)``, round half
        to even, clip), in numpy so that export does not trace it."""
        s = self.scheme
        shape = [1] * x.ndim
        if s.per_channel:
            shape[s.axis % x.ndim] = -1
        scale = self.scale.detach().cpu().float().numpy().reshape(shape)
        zp = self.zero_point.detach().cpu().numpy().astype(np.int64).reshape(shape)
        inv = (np.float32(1.0) / scale).astype(np.float32)
        q = np.rint(x.detach().cpu().float().numpy() * inv).astype(np.int64) + zp
        return np.clip(q, s.qmin, s.qmax)

    def extra_repr(self) -> str:
        state = "fixed range" if self.fixed_range else "calibrated" if self.is_calibrated else "NOT calibrated"
        return f"{self.name}: {self.scheme.describe()}, {state}, fake_quant={self._fake_quant_on}"


# Bias codes are clipped to +-2**30, not the int32 limits: integer kernels add the bias to an int32 accumulator,
# so a bias at the limit overflows it (seen in ORT's QLinearConv); 2**30 leaves room for any realistic conv sum.
# (Also, float32 cannot hold 2**31 - 1: it rounds to 2**31, which wraps negative in int32.)
_INT32_F32_MAX = float(2**30)


def quantize_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bias on the int32 grid of ``scale = s_input * s_weight`` (what integer kernels add to the accumulator).

    The scale is used exactly as is: ORT's fused QLinearConv assumes ``s_input * s_weight`` whatever the bias
    DequantizeLinear says, so any clamping here would make PyTorch and ORT disagree. A bias too large for int32 at
    that scale is clipped, in both. (Scales are >= qparams.scale_floor, about 1e-9 even for 16-bit
    grids, so the product is never zero in float32.)
    """
    scale = scale.detach()
    q = torch.clamp(torch.round(bias / scale), -_INT32_F32_MAX, _INT32_F32_MAX)
    y = bias + (q * scale - bias).detach()  # straight-through
    if torch.onnx.is_in_onnx_export():
        # the zero point (0, ONNX's default) written out: vendor compilers (rknn-toolkit2) fail on a DequantizeLinear
        # without one, and ORT's quantize_static always writes it (docs/targets.md)
        s = _qparams_np(scale, None)[0]
        return export_dequant_const(q.detach().cpu().numpy().astype(np.int32), y, s, np.zeros(s.shape, np.int32), 0)
    return y
