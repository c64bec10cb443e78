"""Quantized weights kept between forwards without autograd inside kept_layers (qatkit.runtime.layer_cache, used by
calibration, verify and the sensitivity sweep): a kept layer gives exactly what recomputing gives, every change of
what it is computed from is noticed, and outside the scope nothing is kept."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import qatkit
from qatkit import quantization_state
from qatkit.runtime.layer_cache import kept_layers


class ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.silu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def quantized(recipe: str = "onnxruntime") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = ConvBnNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.3, 0.3)
    x = torch.rand(2, 3, 12, 12)
    qatkit.quantize(net, recipe, (x,))
    qatkit.calibrate(net, [torch.rand(2, 3, 12, 12) for _ in range(2)], method="max")
    return net.eval(), x


def weight_scale_versions(net: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """The weight quantizers' scales with their version counters: each recompute stores the scale again, copied
    into the buffer (a new version) or as a new tensor (the buffer itself replaced). The tensors are held, so a
    replaced one's id is not reused."""
    return [(q.scale, q.scale._version) for q in quantization_state(net).quantizers.values() if q.dynamic]


def _same(a: list[tuple[torch.Tensor, int]], b: list[tuple[torch.Tensor, int]]) -> bool:
    return len(a) == len(b) and all(ta is tb and va == vb for (ta, va), (tb, vb) in zip(a, b))


def fresh_eval(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eval output recomputed from scratch (a deep copy, outside any kept_layers scope)."""
    with torch.no_grad():
        return copy.deepcopy(net)(x)


def cache_of(net: nn.Module):
    return quantization_state(net)._model_hooks[0].run.layers


@pytest.mark.parametrize("recipe", ["onnxruntime", "tensorrt"])
def test_repeated_eval_reuses_layers_with_identical_output(recipe):
    net, x = quantized(recipe)
    with torch.no_grad(), kept_layers(net):
        first = net(x)
        versions = weight_scale_versions(net)
        second = net(x)
        assert _same(weight_scale_versions(net), versions), "the second forward recomputed the weights"
        with torch.inference_mode():
            third = net(x)
        assert len(cache_of(net)) == len(versions) > 0  # one per quantized layer
    assert len(cache_of(net)) == 0, "leaving the scope frees the kept layers"
    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(first, fresh_eval(net, x))


def test_outside_the_scope_every_forward_computes_its_layers():
    """A change through .data keeps the parameter's version counter: outside kept_layers it must still be seen."""
    net, x = quantized()
    with torch.no_grad():
        before = net(x)
        versions = weight_scale_versions(net)
        net(x)
        now = weight_scale_versions(net)
        assert all(t is not old or v != version for (t, v), (old, version) in zip(now, versions))
        assert len(cache_of(net)) == 0
        net.conv1.weight.data.mul_(0.5)
        after = net(x)
    assert not torch.equal(before, after) and torch.equal(after, fresh_eval(net, x))


def test_training_step_invalidates_and_eval_matches_a_fresh_copy():
    net, x = quantized()
    with kept_layers(net):
        with torch.no_grad():
            before = net(x)
        net.train()  # BN live: running statistics move in place too
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        net(x).square().mean().backward()
        opt.step()
        assert len(cache_of(net)) == 0, "a forward with autograd frees the kept layers"
        net.eval()
        with torch.no_grad():
            after = net(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh_eval(net, x))


@pytest.mark.parametrize("change", ["weight in place", "bn statistics", "load_state_dict", "recalibrate",
                                    "fake-quant off", "new parameter", "new data", "to float64 and back"])
def test_every_source_change_is_noticed(change):
    net, x = quantized()
    with torch.no_grad(), kept_layers(net):
        net(x)
        if change == "weight in place":
            net.conv2.weight.mul_(1.5)
        elif change == "bn statistics":
            net.bn1.running_var.mul_(3.0)
        elif change == "load_state_dict":
            other, _ = quantized()
            other.conv1.weight.add_(0.2)
            net.load_state_dict(other.state_dict())
        elif change == "recalibrate":
            qatkit.calibrate(net, [torch.rand(2, 3, 12, 12) * 4], method="max")
        elif change == "fake-quant off":
            for q in quantization_state(net).quantizers.values():
                q.enable_fake_quant(False)
        elif change == "new parameter":
            net.conv1.weight = nn.Parameter(net.conv1.weight.detach() * 0.5)
        elif change == "new data":  # the same Parameter, its version counter unchanged: caught by the address
            net.conv2.weight.data = net.conv2.weight.detach() * 0.5
        else:
            net.double()
            net.float()
            net.conv2.weight.data.mul_(1.0)  # (keeps values: the conversion alone must be noticed)
        assert torch.equal(net(x), fresh_eval(net, x))


def test_copies_of_a_model_with_kept_layers():
    net, x = quantized()
    with torch.no_grad(), kept_layers(net):
        expected = net(x)
        copied = copy.deepcopy(net)
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(copied(x), expected) and torch.equal(loaded(x), expected)


@pytest.mark.parametrize("recipe", ["onnxruntime", "npu-uint8"])
def test_forwards_without_autograd_equal_forwards_with_it(recipe):
    """Kept layers and the SiLU's product written into its sigmoid's tensor change no value."""
    net, x = quantized(recipe)
    with_grad = net(x)
    with torch.no_grad(), kept_layers(net):
        without = net(x)
        again = net(x)
    assert with_grad.requires_grad
    assert torch.equal(with_grad.detach(), without) and torch.equal(without, again)
