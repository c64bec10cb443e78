"""Recipe selectors that match nothing are errors naming the entry and the closest real names (issue #11)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nets import Block, ModeShy

import qatkit
from qatkit.errors import QatkitWarning

X = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """Module paths stem, b1.conv, b1.act, b2..., head; functional ops /add#0 and /cat#0 at the root."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = Block(8)
        self.b2 = Block(8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.b1(x) + x
        return self.head(torch.cat([self.b2(y), y], 1))


def quantized(extra: dict, model: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    return qatkit.quantize((model or Net()).eval(), {"base": "onnxruntime", **extra}, (X,))


def test_every_kind_of_selector_that_matches_is_accepted_and_applied():
    net = quantized({"skip": [r"b2\.conv"], "rules": [
        {"object_type": "Block", "activation": {"bits": 6}},          # a module class (and what is inside it)
        {"object_type": "cat", "quantize_output": False},             # a functional op kind, at its boundary
        {"module_name_regex": r"b\d\.act", "weight": {"bits": 5}},    # a regex on module paths
        {"module_name": "/add#0", "activation": {"bits": 4}},        # a functional op key
        {"module_name": "b1", "quantize_input": True},                # a module boundary
        {"module_name": "b1.act", "skip": False},                     # an existing module without weights: fine
    ]})
    state = qatkit.quantization_state(net)
    bits = {q.name: q.scheme.bits for q in state.quantizers.values()}
    assert "b2.conv" in state.float_layers  # the skip entry applied
    assert bits["b1.act/output"] == 6 and bits["/add#0/output"] == 4
    assert "/cat#0/output" not in bits  # quantize_output: false on the concat


@pytest.mark.parametrize("recipe, named, closest", [
    ({"rules": [{"object_type": "Conv2D", "skip": True}]}, "rule 0 (object_type: 'Conv2D')", "'Conv2d'"),
    ({"rules": [{"object_type": "ad", "skip": True}]}, "rule 0 (object_type: 'ad')", "'add'"),
    ({"rules": [{"module_name": "stem", "skip": True}, {"module_name_regex": r"b1\.cnv", "skip": True}]},
     r"rule 1 (module_name_regex: 'b1\\.cnv')", "'b1.conv'"),
    ({"rules": [{"module_name": "b1.conv2", "weight": {"bits": 4}}]}, "rule 0 (module_name: 'b1.conv2')",
     "'b1.conv'"),
    ({"rules": [{"module_name": "/add#1", "skip": True}]}, "rule 0 (module_name: '/add#1')", "'/add#0'"),
    ({"skip": ["stem", "haed"]}, "skip entry 1 (module_name_regex: 'haed')", "'head'"),
    ({"rules": [{"module_name": "b3", "quantize_output": False}]}, "rule 0 (module_name: 'b3')", "'b1'"),
])
def test_a_selector_that_matches_nothing_names_itself_and_the_closest_names(recipe, named, closest):
    with pytest.raises(qatkit.RecipeError) as info:
        quantized(recipe)
    message = str(info.value)
    assert named in message and "matches no layer of Net" in message
    assert "closest" in message and closest in message, message


def test_a_boundary_rule_must_name_a_submodule_or_op_not_only_the_whole_model():
    # object_type Net matches every layer through its root, but the root has no boundary of its own
    assert quantized({"rules": [{"object_type": "Net", "activation": {"bits": 6}}]})  # a scheme rule: fine
    with pytest.raises(qatkit.RecipeError, match=r"rule 0 \(object_type: 'Net'\) sets quantize_input/quantize_"
                                                 r"output but names no submodule.*quantize_model_outputs"):
        quantized({"rules": [{"object_type": "Net", "quantize_output": False}]})


def test_silu_to_relu_recipes_are_told_why_silu_is_gone():
    with pytest.raises(qatkit.RecipeError, match=r"silu_to_relu replaced the SiLU modules.*closest.*'ReLU'"):
        quantized({"silu_to_relu": True, "rules": [{"object_type": "SiLU", "skip": True}]})


def test_after_a_capture_fallback_op_selectors_are_not_checked_but_module_selectors_are():
    op_rules = [{"object_type": "add", "skip": True}, {"module_name": "/add#0", "skip": True}]
    with pytest.warns(QatkitWarning, match="capture stopped"):
        net = quantized({"rules": op_rules + [{"module_name": "a", "skip": True}]}, ModeShy())
    assert qatkit.quantization_state(net).float_layers == ["a"]
    with pytest.warns(QatkitWarning, match="capture stopped"), \
            pytest.raises(qatkit.RecipeError, match=r"rule 2 \(module_name: 'aa'\).*closest.*'a'"):
        quantized({"rules": op_rules + [{"module_name": "aa", "skip": True}]}, ModeShy())


def test_keep_float_recipe_of_the_sensitivity_sweep_validates():
    from qatkit.analysis.sensitivity import group_of, groups, keep_float_recipe

    net = quantized({})
    keep = sorted(groups(net))  # every quantizer group: module paths, op keys and the model input
    recipe = keep_float_recipe({"base": "onnxruntime"}, keep)
    assert recipe["quantize_model_input"] is False and len(recipe["rules"]) == len(keep) - 1
    again = quantized({k: v for k, v in recipe.items() if k != "base"})
    left = {group_of(q.name) for q in qatkit.quantization_state(again).quantizers.values()}
    assert left.isdisjoint(keep)  # every rule matched and kept its group float
