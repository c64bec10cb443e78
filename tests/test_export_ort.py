"""Quantize -> calibrate -> export QDQ ONNX -> ONNX Runtime, on a small Conv-BN-SiLU net, for both built-in recipes.

One module-scoped pipeline per recipe keeps the file fast on 2 cores; every test reads it without mutating it
(tests that run the model in train mode build their own copy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import qatkit
from qatkit.targets.ort import fused_op_counts

RECIPES = ["onnxruntime", "tensorrt"]
# the onnxruntime recipe's own calibrator (mse) costs ~0.5 s per quantizer on 2 cores: use 'max' there, and the
# recipe's own calibrator for tensorrt (5 quantizers), so both paths are exercised within the time budget
CALIB_METHOD = {"onnxruntime": "max", "tensorrt": None}
CONVS = ["stem.conv", "b1.conv", "b2.conv", "b3.conv", "up.conv", "head"]


class ConvBnSiLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TinyNet(nn.Module):
    """Residual add, chunk, cat, max-pool, nearest 2x upsample and a 1x1 output conv with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnSiLU(3, 8, 3, 2)  # 8 x 16 x 16
        self.b1 = ConvBnSiLU(8, 8)
        self.b2 = ConvBnSiLU(4, 4)
        self.b3 = ConvBnSiLU(16, 8)
        self.up = ConvBnSiLU(8, 8)
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b1(x)
        a, b = x.chunk(2, 1)
        x = self.b3(torch.cat([a, self.b2(b), x], 1))
        p = self.up(F.max_pool2d(x, 2))  # 8 x 8 x 8
        u = F.interpolate(p, scale_factor=2)  # nearest, back to 16 x 16
        return self.head(torch.cat([x, u], 1))


def make_net(seed: int = 0) -> TinyNet:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        net = TinyNet()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics so that folding matters
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.3, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def batches(seed: int, n: int, batch: int = 1, lo: float = 0.0, hi: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 32, 32, generator=g) * (hi - lo) + lo for _ in range(n)]


def folded_weight(net: nn.Module, conv: str) -> torch.Tensor:
    """What the deployed conv weight must be: the float weight with its BatchNorm folded in."""
    w = net.get_submodule(conv).weight.detach()
    if conv == "head":
        return w
    bn = net.get_submodule(conv.replace(".conv", ".bn"))
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return w * factor.reshape(-1, 1, 1, 1)


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph by name: initializers and Constant nodes' values."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass
class Pipeline:
    recipe: str
    float_net: TinyNet
    net: TinyNet
    path: Path
    onnx_model: onnx.ModelProto
    consts: dict[str, np.ndarray]
    x: torch.Tensor


@pytest.fixture(scope="module", params=RECIPES)
def pipe(request, tmp_path_factory) -> Pipeline:
    recipe = request.param
    net = make_net()
    float_net = copy.deepcopy(net)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    out = qatkit.quantize(net, recipe, (x,))
    assert out is net
    report = qatkit.calibrate(net, batches(1, 4), method=CALIB_METHOD[recipe])
    assert report.batches == 4
    path = qatkit.export_onnx(net, (x,), tmp_path_factory.mktemp(recipe) / "m.onnx")
    model = onnx.load(str(path))
    return Pipeline(recipe, float_net, net, Path(path), model, constants(model), x)


def weight_dqs(p: Pipeline) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """DequantizeLinear nodes of int8 rank-4 constants (conv weights): (node, int8 codes, scale)."""
    found = []
    for node in p.onnx_model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = p.consts.get(node.input[0])
        if q is not None and q.dtype == np.int8 and q.ndim == 4:
            found.append((node, q, p.consts[node.input[1]]))
    return found


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


# ---------------------------------------------------------------- the file itself
def test_onnx_is_valid_with_opset_13_or_later(pipe):
    onnx.checker.check_model(pipe.onnx_model)
    default = [o.version for o in pipe.onnx_model.opset_import if o.domain in ("", "ai.onnx")]
    assert default and default[0] >= 13  # per-channel QuantizeLinear/DequantizeLinear need opset 13
    ops = {n.op_type for n in pipe.onnx_model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # the fake-quant ops must not leak into the graph as float emulation
    assert not any("FakeQuant" in op for op in ops)


def test_every_quantize_and_dequantize_reads_initializers_with_a_zero_point(pipe):
    # legal ONNX may leave it out, but vendor compilers are tested on files that always write it (quantize_static's)
    # (and keep every constant as an initializer, as quantize_static does: no Constant nodes)
    graph = pipe.onnx_model.graph
    initializers = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "Constant"]
    nodes = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert nodes
    for node in nodes:
        assert len(node.input) == 3 and set(node.input[1:]) <= initializers, (node.name, list(node.input))


def test_ort_agrees_with_pytorch_within_one_step(pipe):
    # calibration batches, a batch of 2 (dynamic batch axis) and out-of-range inputs that exercise clipping
    data = batches(1, 2) + batches(5, 1, batch=2) + batches(6, 2, lo=-0.5, hi=1.8)
    report = qatkit.verify(pipe.net, pipe.path, data)
    assert report.batches == 5
    # layer-wise: every quantized tensor is compared, so more values than the 6 x 16 x 16 x 6 model outputs
    assert report.values > 6 * 16 * 16 * 6
    assert report.within_one_step >= 0.999, report
    assert report.outputs_within_one_step >= 0.999, report
    assert report.max_steps <= 2, report
    # exposing the intermediate tensors must not change what ORT computes
    assert report.tapped_outputs_identical
    assert 0.0 <= report.free_running_within_one_step <= 1.0 and np.isfinite(report.free_running_max_steps)


def test_quantized_model_stays_close_to_float_model(pipe):
    data = batches(7, 2)
    with torch.no_grad():
        for xb in data:
            ref, got = pipe.float_net(xb), pipe.net(xb)
            assert got.shape == ref.shape
            rel = float((got - ref).norm() / ref.norm())
            assert rel < 0.05, rel
            assert not torch.equal(got, ref)  # the quantizers do act


# ---------------------------------------------------------------- per-channel weights in the graph
def test_conv_weights_are_int8_per_channel_axis0(pipe):
    found = weight_dqs(pipe)
    expected_convs = 6 if pipe.recipe == "onnxruntime" else 5  # tensorrt keeps the output conv float
    assert len(found) == expected_convs
    scheme = qatkit.load_recipe(pipe.recipe).weight
    for node, q, scale in found:
        assert attr(node, "axis") == 0, node.name
        assert scale.ndim == 1 and scale.shape[0] == q.shape[0], (node.name, scale.shape, q.shape)
        assert scale.dtype == np.float32 and bool((scale > 0).all())
        assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax, (node.name, q.min(), q.max())
        if len(node.input) > 2:  # symmetric weights: zero point 0
            zp = pipe.consts[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
        # a dynamic symmetric range puts each channel's largest |weight| on the grid's edge
        per_channel_max = np.abs(q.astype(np.int32)).reshape(q.shape[0], -1).max(axis=1)
        assert set(per_channel_max.tolist()) <= {scheme.qmax, -scheme.qmin}, per_channel_max


def test_onnxruntime_recipe_weight_grid_is_7_bit():
    scheme = qatkit.load_recipe("onnxruntime").weight
    assert (scheme.qmin, scheme.qmax) == (-64, 63)
    scheme = qatkit.load_recipe("tensorrt").weight
    assert (scheme.qmin, scheme.qmax) == (-127, 127)


def test_exported_weights_are_the_bn_folded_weights(pipe):
    """Dequantized int8 weights equal the float weights with BatchNorm folded in, to half a step."""
    remaining = {c: folded_weight(pipe.float_net, c).numpy() for c in CONVS}
    if pipe.recipe == "tensorrt":
        del remaining["head"]
    for node, q, scale in weight_dqs(pipe):
        deq = q.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
        half = scale.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-4) + 1e-7
        match = [c for c, w in remaining.items() if w.shape == deq.shape and bool((np.abs(deq - w) <= half).all())]
        assert len(match) == 1, (node.name, match)
        del remaining[match[0]]
    assert not remaining


@pytest.mark.parametrize("pipe", ["onnxruntime"], indirect=True)
def test_conv_bias_goes_through_int32_dequantize(pipe):
    assert pipe.recipe == "onnxruntime"
    prod = producers(pipe.onnx_model)
    convs = [n for n in pipe.onnx_model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 6
    for conv in convs:
        assert len(conv.input) == 3, conv.name  # folded BN gives every conv a bias
        dq = prod.get(conv.input[2])
        assert dq is not None and dq.op_type == "DequantizeLinear", conv.name
        q = pipe.consts[dq.input[0]]
        assert q.dtype == np.int32 and q.ndim == 1
        scale = pipe.consts[dq.input[1]]
        assert scale.shape == q.shape  # per output channel: s_in * s_w[c]
        # the zero point written out (rknn-toolkit2's compiler fails without it): int32 zeros, one per channel
        zp = pipe.consts[dq.input[2]]
        assert zp.dtype == np.int32 and zp.shape == scale.shape and not zp.any()
    # the head's bias (no BN) is its own bias on the int32 grid
    head = next(c for c in convs if c.name.startswith("/head"))
    dq = prod[head.input[2]]
    deq = pipe.consts[dq.input[0]].astype(np.float64) * pipe.consts[dq.input[1]]
    bias = pipe.float_net.head.bias.detach().numpy()
    np.testing.assert_allclose(deq, bias, rtol=0, atol=float(pipe.consts[dq.input[1]].max()) / 2 + 1e-9)


# ---------------------------------------------------------------- what each runtime does with it
@pytest.mark.parametrize("pipe", ["onnxruntime"], indirect=True)
def test_onnxruntime_fuses_every_conv_into_qlinearconv(pipe):
    assert pipe.recipe == "onnxruntime"
    counts = fused_op_counts(pipe.path)
    assert counts.get("QLinearConv", 0) == len(CONVS), counts
    assert counts.get("Conv", 0) == 0, counts
    assert counts.get("QLinearConcat", 0) == 2, counts


@pytest.mark.parametrize("pipe", ["tensorrt"], indirect=True)
def test_tensorrt_output_conv_stays_float(pipe):
    assert pipe.recipe == "tensorrt"
    assert qatkit.load_recipe("tensorrt").keep_output_convs_float
    sites = qatkit.quantization_state(pipe.net).sites
    assert "head" not in sites
    for conv in CONVS[:-1]:
        assert sites[conv].weight is not None and 0 in sites[conv].inputs, conv
    # and in the graph: the head conv reads a float weight, and its input comes from no DequantizeLinear
    prod = producers(pipe.onnx_model)
    head = next(n for n in pipe.onnx_model.graph.node if n.op_type == "Conv" and n.name.startswith("/head"))
    w = pipe.consts.get(head.input[1])
    assert w is not None and w.dtype == np.float32
    np.testing.assert_array_equal(w, pipe.float_net.head.weight.detach().numpy())
    assert prod[head.input[0]].op_type != "DequantizeLinear"
    # the other convs do read Q -> DQ inputs
    others = [n for n in pipe.onnx_model.graph.node if n.op_type == "Conv" and n is not head]
    assert len(others) == 5
    for conv in others:
        assert prod[conv.input[0]].op_type == "DequantizeLinear", conv.name


@pytest.mark.parametrize("pipe", ["onnxruntime"], indirect=True)
def test_onnxruntime_sites_cover_every_conv_and_functional_op(pipe):
    assert pipe.recipe == "onnxruntime"
    sites = qatkit.quantization_state(pipe.net).sites
    for conv in CONVS:
        assert sites[conv].weight == f"{conv}/weight", conv
        assert sites[conv].bias_from is not None, conv
    for bn in ("stem.bn", "b1.bn", "b2.bn", "b3.bn", "up.bn"):
        assert sites[bn].identity, bn
    assert sites["stem.conv"].fold_bn == "stem.bn"
    # shape-only ops re-apply their input's quantizer (one scale in and out)
    assert sites["/max_pool2d#0"].output == sites["b3.act"].output
    assert sites["/interpolate#0"].output == sites["up.act"].output
    assert sites["/chunk#0"].output == sites["/add#0"].output
    # value-making ops get their own quantizer, except that a concat shares one with its inputs:
    # cat#0 reads (chunk of add, b2, add) -> one group; cat#1 reads (b3 output, upsample of up.act) -> another
    assert sites["/cat#0"].output == sites["/add#0"].output == sites["b2.act"].output
    assert sites["/cat#1"].output == sites["b3.act"].output == sites["up.act"].output
    assert sites["/cat#0"].output != sites["/cat#1"].output
    assert sites["b1.act"].output != sites["/add#0"].output
    assert qatkit.uncalibrated(pipe.net) == []


# ---------------------------------------------------------------- the model stays the user's model
def test_quantized_model_keeps_class_and_state_dict_keys(pipe):
    assert type(pipe.net) is TinyNet
    assert isinstance(pipe.net, TinyNet)
    float_sd = pipe.float_net.state_dict()
    q_sd = pipe.net.state_dict()
    missing = set(float_sd) - set(q_sd)
    assert not missing, missing
    for k, v in float_sd.items():  # quantize() changes no weight
        assert torch.equal(q_sd[k], v), k
    assert any(k.startswith("_qatkit.") for k in q_sd)


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantized_forward_works_in_train_and_eval(recipe):
    net = make_net(seed=3)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    qatkit.quantize(net, recipe, (x[:1],))
    qatkit.calibrate(net, batches(2, 2), method="max")
    assert type(net) is TinyNet
    net.train()
    out = net(x)
    assert out.shape == (2, 6, 16, 16) and bool(torch.isfinite(out).all())
    out.square().mean().backward()
    for conv in CONVS:  # straight-through gradients reach every conv weight
        g = net.get_submodule(conv).weight.grad
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0, conv
    # the folded BatchNorm's affine parameters are trained through the fold
    assert net.stem.bn.weight.grad is not None and float(net.stem.bn.weight.grad.abs().sum()) > 0
    assert net.training  # calibrate/forward left the mode alone
    net.eval()
    with torch.no_grad():
        out_eval = net(x)
        again = net(x)
    assert out_eval.shape == (2, 6, 16, 16) and bool(torch.isfinite(out_eval).all())
    assert torch.equal(out_eval, again)


class OneConv(nn.Module):
    """y = conv(x) with weight 1 and bias 0: whatever the input quantizer clips shows in the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def _clip_agreement(tmp_path: Path, act_bits: int) -> tuple[torch.Tensor, qatkit.VerifyReport]:
    net = OneConv().eval()
    x = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    qatkit.quantize(net, {"base": "onnxruntime", "activation": {"bits": act_bits}}, (x,))
    qatkit.calibrate(net, [x], method="max")  # input and output ranges [0, 1]
    path = qatkit.export_onnx(net, (x,), tmp_path / f"a{act_bits}.onnx")
    big = torch.full((1, 1, 4, 4), 3.0)  # far above the calibrated range: must clip to 1.0
    with torch.no_grad():
        out = net(big)
    return out, qatkit.verify(net, path, [big, x])


def test_8_bit_activation_clipping_agrees_in_ort(tmp_path):
    out, report = _clip_agreement(tmp_path, 8)
    torch.testing.assert_close(out, torch.ones_like(out))
    assert report.within_one_step == 1.0, report


def test_sub_8_bit_activation_clipping_agrees_in_ort(tmp_path):
    out, report = _clip_agreement(tmp_path, 6)
    torch.testing.assert_close(out, torch.ones_like(out))
    assert report.within_one_step >= 0.999, report


def test_verify_restores_training_mode(tmp_path):
    net = make_net(seed=4)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    qatkit.quantize(net, "tensorrt", (x,))
    qatkit.calibrate(net, batches(1, 1), method="max")
    path = qatkit.export_onnx(net, (x,), tmp_path / "v.onnx")
    net.train()
    qatkit.verify(net, path, batches(1, 1))
    assert net.training


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantized_sequential_keeps_its_forward(recipe):
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)).eval()
    x = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    with torch.no_grad():
        ref = net(x)
    qatkit.quantize(net, recipe, (x,))
    qatkit.calibrate(net, [x], method="max")
    with torch.no_grad():
        out = net(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 0.1


def test_concat_inputs_and_output_share_one_quantizer():
    net = make_net(seed=5)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    qatkit.quantize(net, "onnxruntime", (x,))
    state = qatkit.quantization_state(net)
    graph = qatkit.capture(make_net(seed=5), (x,))
    cats = [n for n in graph.nodes.values() if n.kind == "cat"]
    assert cats
    for cat in cats:
        out = state.sites[cat.key].output
        producers = [state.sites[e[0]].output for e in cat.inputs if e is not None and e[0] in state.sites]
        assert producers and all(p == out for p in producers), (cat.key, out, producers)


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock pattern: conv-bn-relu, conv-bn, += identity, relu (one ReLU module, called twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class _ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.block1, self.block2 = _BasicBlock(), _BasicBlock()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.relu(self.stem(x)))))


def test_residual_add_then_relu_fuses_like_quantize_static(tmp_path):
    """add -> relu gets one quantizer, after the relu: ORT fuses it into QLinearAdd with no requantization left
    (a quantizer of its own on the add output left a DequantizeLinear -> QuantizeLinear pair per block, as
    onnxruntime's quantize_static does not), and ORT still agrees with PyTorch."""
    torch.manual_seed(0)
    net = _ResidualNet().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    qatkit.quantize(net, "onnxruntime", (x[:1],))
    assert "add_#0" not in " ".join(qatkit.quantization_state(net).sites)  # the add's output is the relu's
    qatkit.calibrate(net, [x])
    path = qatkit.export_onnx(net, (x[:1],), tmp_path / "residual.onnx")
    counts = fused_op_counts(path)
    assert counts.get("QLinearAdd", 0) == 2 and counts.get("QuantizeLinear", 0) == 1, counts  # the model input's
    assert qatkit.verify(net, path, [x]).within_one_step >= 0.999
