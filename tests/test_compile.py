"""torch.compile of a quantized model: one graph, no recompiles across calls and train/eval switches, and eager's
outputs and gradients (docs/performance.md lists what still costs time)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qatkit
from qatkit.errors import QatkitError, QatkitWarning
from qatkit.runtime.hooks import COMPILE_OUTSIDE_HOOKS


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


class _Custom(nn.Module):
    """A root whose class is not from torch.nn (torch.compile runs its hooks outside the graph), with a
    functional add at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _net()[:5]
        self.skip = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


def _quantized(make=_net) -> tuple[nn.Module, torch.Tensor]:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = make().eval()
    qatkit.quantize(model, "onnxruntime", (x,))
    qatkit.calibrate(model, [x])
    return model, x


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no graphs cached by an earlier test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_eval_matches_eager() -> None:
    model, x = _quantized()
    eager = model(x)
    compiled = torch.compile(model)
    assert torch.equal(compiled(x), eager)
    y = torch.rand(2, 3, 16, 16)
    assert torch.equal(compiled(y), model(y))


def _train_step_grads(bn_frozen: bool) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    model, x = _quantized()
    twin, _ = _quantized()
    for m in (model, twin):
        m.train()
        if bn_frozen:
            qatkit.freeze(m, bn=True)
    compiled = torch.compile(twin)
    assert torch.equal(compiled(x), model(x))
    model(x).square().sum().backward()
    compiled(x).square().sum().backward()
    return [(name, a.grad, b.grad) for (name, a), b in zip(model.named_parameters(), twin.parameters())]


def test_compiled_train_step_matches_eager() -> None:
    for name, a, b in _train_step_grads(bn_frozen=True):  # inductor's reductions: last-bit differences
        assert a is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_compiled_training_with_live_bn_is_refused() -> None:
    """With BN live, AOTAutograd (torch 2.14) recomputes the fold from running_var in the backward after BN updated
    it in place: aot_eager_decomp_partition says 'modified by an inplace operation', inductor silently gives other
    gradients. qatkit refuses it with the fix; with BN frozen it trains (above), without grad it runs."""
    model, x = _quantized()
    model.train()
    compiled = torch.compile(lambda t: model(t))
    with pytest.raises(QatkitError, match=r"qatkit.freeze\(model, bn=True\)"):
        compiled(x).square().sum().backward()
    with torch.no_grad():
        assert torch.equal(torch.compile(lambda t: model(t))(x), model(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_one_graph_no_breaks(mode: str) -> None:
    """Flags are Python mirrors, per-step ranges skip the NaN check, and the torch-function mode and hooks trace."""
    model, x = _quantized()
    qatkit.freeze(model, bn=True)  # compiled training needs BN frozen (test_compiled_training_with_live_bn_is_refused)
    getattr(model, mode)()
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_calls_and_mode_switches_do_not_recompile() -> None:
    """One graph for eval, one for train (``training`` is a guard); repeated calls and switching back reuse them."""
    model, x = _quantized()
    qatkit.freeze(model, bn=True)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo's guards are the same with any backend
    torch._dynamo.utils.counters.clear()
    compiled(x)
    compiled(x)
    model.train()
    compiled(x).sum().backward()
    compiled(x).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for mode in ("eval", "train", "eval", "train"):
            getattr(model, mode)()
            compiled(x)


def test_custom_root_compiles_to_one_graph_with_wrap_top_frame() -> None:
    model, x = _quantized(_Custom)
    with torch._dynamo.config.patch(wrap_top_frame=True):
        explained = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, backend="aot_eager")
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with warnings.catch_warnings():
        warnings.simplefilter("error", QatkitWarning)
        assert torch.equal(compiled(x), model(x))


def test_custom_root_compiled_with_hooks_outside_says_how_to_fix() -> None:
    model, x = _quantized(_Custom)
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(QatkitWarning, match="wrap_top_frame=True") as record:
        out = compiled(x)
    assert torch.equal(out, model(x))
    assert [str(w.message) for w in record] == [COMPILE_OUTSIDE_HOOKS]
