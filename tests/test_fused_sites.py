"""Run-time fusion of neighbouring quantizers in training: a SiLU's fused kernel also applies its output's quantizer
and the quantizer of the conv output it alone reads. The plan is unchanged, and so are outputs and gradients."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit


class Net(nn.Module):
    """conv-BN-SiLU (module), conv-SiLU (functional), a conv read by a SiLU and a ReLU, a conv-ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.act1(self.bn1(self.c1(x)))
        y = F.silu(self.c2(y))
        z = self.c3(y)
        y = F.silu(z) + F.relu(z)
        return self.head(F.relu(self.c4(y)))


def _quantized() -> nn.Module:
    torch.manual_seed(0)
    qm = qatkit.quantize(Net(), "onnxruntime", (torch.rand(1, 3, 32, 32),))
    qatkit.calibrate(qm, [torch.rand(4, 3, 32, 32) * 2 for _ in range(2)], method="max")
    return qatkit.freeze(qm, bn=True)


def _step(qm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    qm.train()
    qm.zero_grad(set_to_none=True)
    out = qm(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in qm.named_parameters()}


def test_only_convs_read_by_a_silu_alone_are_marked():
    state = qatkit.quantization_state(_quantized())
    assert state.silu_reads == {"c1": "act1", "c2": "/silu#0"}  # c3 is read by a ReLU too; c4 by a ReLU


def test_fused_quantizers_give_the_same_outputs_and_gradients_bit_for_bit():
    """With the conv-output quantizers left to the SiLUs (the default) and without (each applied where the tensor
    is made), a training step's outputs and every gradient are identical, and the fused kernels did run."""
    x = torch.rand(2, 3, 32, 32) * 2
    fused = _quantized()
    plain = copy.deepcopy(fused)
    qatkit.quantization_state(plain).silu_reads = {}
    calls: list[str] = []
    from qatkit.quant import kernels

    run = kernels.KERNELS.run
    kernels.KERNELS.run = lambda which, *a: calls.append(which) or run(which, *a)
    try:
        out_f, grads_f = _step(fused, x)
    finally:
        kernels.KERNELS.run = run
    out_p, grads_p = _step(plain, x)
    assert calls.count("silu_in_out_forward") == 2 and calls.count("silu_in_out_backward") == 2
    assert torch.equal(out_f, out_p)
    for name, g in grads_f.items():
        assert torch.equal(g, grads_p[name]), name


def test_unfused_run_time_agrees():
    """The same step with every fusion off (a verify tap makes qatkit run each quantizer on its own): equal up to
    the compiled sigmoid's last-bit differences."""
    x = torch.rand(2, 3, 32, 32) * 2
    fused = _quantized()
    plain = copy.deepcopy(fused)
    qatkit.quantization_state(plain).tap = lambda q, y: y
    out_f, grads_f = _step(fused, x)
    out_p, grads_p = _step(plain, x)
    step = max(float(q.scale.max()) for q in qatkit.quantization_state(fused).quantizers.values())
    assert (out_f - out_p).abs().max() <= step  # a value on a rounding edge may move by one step
    assert (out_f == out_p).float().mean() > 0.99


class LateReader(nn.Module):
    """conv-BN-SiLU whose conv output gets, in a mode set after capture, another reader (before or after the SiLU),
    is returned as well, or is not used at all."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.head = nn.Conv2d(8, 4, 1)
        self.late = "none"

    def forward(self, x):
        z = self.bn1(self.c1(x))
        if self.late == "unused":
            return self.head(x.repeat(1, 3, 1, 1)[:, :8])
        if self.late == "raise":
            raise RuntimeError("the model's own error")
        early = z * 2.0 if self.late == "before" else None
        y = self.act1(z)
        if early is not None:
            y = y + early
        if self.late == "after":
            y = y * torch.sigmoid(z)
        out = self.head(y)
        return (out, z) if self.late == "returned" else out


def _late_reader(late: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    qm = qatkit.quantize(LateReader(), "onnxruntime", (torch.rand(1, 3, 32, 32),))
    qatkit.calibrate(qm, [torch.rand(4, 3, 32, 32) * 2], method="max")
    qatkit.freeze(qm, bn=True)
    plain = copy.deepcopy(qm)
    qatkit.quantization_state(plain).silu_reads = {}
    for m in (qm, plain):
        m.late = late
    return qm, plain


@pytest.mark.parametrize("late", ["before", "after", "returned"])
def test_a_reader_capture_did_not_see_gets_the_quantized_conv_output(late):
    """Any op but the SiLU that reads a conv output left raw for that SiLU (here ops capture never saw, in a mode
    set afterwards), and the model's return, get the quantized value, as with nothing deferred: outputs and
    gradients bit for bit."""
    fused, plain = _late_reader(late)
    assert qatkit.quantization_state(fused).silu_reads == {"c1": "act1"}
    x = torch.rand(2, 3, 32, 32) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qatkit.QatkitWarning)  # (the unseen ops run float, as qatkit warns)
        results = []
        for qm in (fused, plain):
            qm.train()
            qm.zero_grad(set_to_none=True)
            out = qm(x)
            outs = out if isinstance(out, tuple) else (out,)
            sum(o.square().mean() for o in outs).backward()
            results.append(([o.detach() for o in outs], {n: p.grad for n, p in qm.named_parameters()}))
    (outs_f, grads_f), (outs_p, grads_p) = results
    assert all(torch.equal(a, b) for a, b in zip(outs_f, outs_p))
    for name, g in grads_f.items():
        assert torch.equal(g, grads_p[name]), name


def test_a_deferred_quantizer_no_op_read_is_an_error(monkeypatch):
    """A conv output left raw that neither its SiLU nor any op read (it could only have left by a way qatkit does
    not see) ends the forward with an error that names the switch; with that switch, nothing is deferred."""
    from qatkit.quant import kernels

    qm, _ = _late_reader("unused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qatkit.QatkitWarning)
        with pytest.raises(qatkit.QatkitError, match="QATKIT_FUSED_FAKE_QUANT=0"):
            _step(qm, torch.rand(2, 3, 32, 32))
        with torch.no_grad():
            qm.eval()(torch.rand(2, 3, 32, 32))  # inference never defers
        monkeypatch.setattr(kernels, "KERNELS", kernels._Kernels.uncompiled())  # as with QATKIT_FUSED_FAKE_QUANT=0
        _step(qm, torch.rand(2, 3, 32, 32))


class Shapes(nn.Module):
    """SiLU outputs through chunk, max-pool and cat (value-preserving ops whose outputs re-apply the same
    quantizer under ``all_activations``); ``inplace`` scales one of them in place first."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.c1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.SiLU()
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.head = nn.Conv2d(24, 4, 1)
        self.inplace = inplace

    def forward(self, x):
        y = self.act1(self.c1(x))
        a, b = y.chunk(2, 1)
        if self.inplace:
            b.mul_(1.5)
        return self.head(torch.cat([a, self.pool(b), a[:, :8]], 1))


@pytest.mark.parametrize("inplace", [False, True])
def test_re_applied_quantizers_are_skipped_only_where_the_values_are_on_their_grid(inplace, monkeypatch):
    """A quantizer re-applied after chunk / max-pool / cat to values already on its grid is skipped: outputs and
    gradients equal the step that applies every one, bit for bit; after an in-place change it is applied again."""
    from qatkit.quant import kernels
    from qatkit.runtime.on_grid import OnGrid

    torch.manual_seed(0)
    qm = qatkit.quantize(Shapes(inplace), "onnxruntime", (torch.rand(1, 3, 32, 32),))
    qatkit.calibrate(qm, [torch.rand(4, 3, 32, 32) * 2], method="max")
    every = copy.deepcopy(qm)
    x = torch.rand(2, 3, 32, 32) * 2
    calls: list[str] = []
    run = kernels.KERNELS.run
    monkeypatch.setattr(kernels.KERNELS, "run", lambda which, *a: calls.append(which) or run(which, *a))
    out_a, grads_a = _step(qm, x)
    skipping = calls.count("forward")
    monkeypatch.setattr(OnGrid, "holds", lambda self, t, q: False)
    calls.clear()
    out_b, grads_b = _step(every, x)
    assert skipping < calls.count("forward") if not inplace else skipping <= calls.count("forward")
    assert torch.equal(out_a, out_b)
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name


def test_a_forward_that_raised_leaves_nothing_behind():
    """A forward that fails after a conv output was left raw for its SiLU raises the model's own error, with no
    word about that output, and the next forward starts clean: the same step as a model that never failed."""
    qm, plain = _late_reader("raise")
    with warnings.catch_warnings(record=True) as seen, pytest.raises(RuntimeError, match="the model's own error"):
        warnings.simplefilter("always")
        _step(qm, torch.rand(2, 3, 32, 32))
    assert not [w for w in seen if "quantizer" in str(w.message)]  # (PyTorch would warn of a silenced hook error)
    qm.late = plain.late = "none"
    x = torch.rand(2, 3, 32, 32)
    out_a, grads_a = _step(qm, x)
    out_b, grads_b = _step(plain, x)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(g, grads_b[n]) for n, g in grads_a.items())


def test_inference_mode_runs_without_the_grid():
    """Inference tensors have no version counter: under torch.inference_mode nothing is remembered, and the output
    equals the no-grad output."""
    torch.manual_seed(0)
    qm = qatkit.quantize(Shapes(False), "onnxruntime", (torch.rand(1, 3, 32, 32),))
    qatkit.calibrate(qm, [torch.rand(4, 3, 32, 32) * 2], method="max")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        y = qm.eval()(x)
    with torch.no_grad():
        assert torch.equal(y, qm(x))


def test_on_grid_notices_in_place_changes_and_freed_tensors():
    from qatkit.runtime.on_grid import OnGrid

    grid, q, other = OnGrid(), object(), object()
    y = torch.zeros(4)
    grid.add(y, q)
    assert grid.holds(y, q) and not grid.holds(y, other) and not grid.holds(y.clone(), q)
    y.add_(1.0)
    assert not grid.holds(y, q)
    grid.add(y, q)
    del y
    assert not grid.holds(torch.zeros(4), q)


def _observed(qm: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """How many values each activation quantizer counts in one calibration forward (mse histograms)."""
    quantizers = qatkit.quantization_state(qm).quantizers.values()
    for q in quantizers:
        q.enable_fake_quant(False)
        if not q.dynamic:
            q.start_observing("mse")
    with torch.no_grad():
        qm.eval()(x)
    return {q.name: float(q.calibrator.hist.counts.sum()) for q in quantizers
            if q.calibrator is not None and q.calibrator.num_batches}


@pytest.mark.parametrize("inplace", [False, True])
def test_calibration_observes_no_concat_or_view_of_what_it_saw(inplace):
    """The SiLU output is observed once, not again as its chunks, as a slice of one or within the concat (before,
    the shared quantizer counted it 4.5 times); the max-pool output, a tensor the head reads, is. Values changed
    in place after the quantizer saw them are new."""
    torch.manual_seed(0)
    qm = qatkit.quantize(Shapes(inplace), "onnxruntime", (torch.rand(1, 3, 32, 32),))
    key = qatkit.quantization_state(qm).sites["act1"].output
    x = torch.rand(2, 3, 32, 32) * 2
    plane = 2 * 32 * 32  # one channel of the batch
    counted = _observed(qm, x)[key]
    if inplace:  # b (half of the SiLU output) scaled in place: its mul_, the slice and the concat hold new values
        assert counted == pytest.approx((16 + 8 + 8 + 8 + 24) * plane, rel=1e-12)  # (re-binned: float counts)
    else:
        assert counted == (16 + 8) * plane
