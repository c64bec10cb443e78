"""Bad input gives clear errors: the right qatkit exception type, with a message that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import qatkit

X = (torch.zeros(1, 3, 16, 16),)


class Small(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(2 * width, 2, 1)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.head(torch.cat([y, self.conv2(y) + y], 1))


class Other(Small):
    """Same layers as Small, another class: a checkpoint of one must not load onto the other."""


class Branchy(nn.Module):
    """conv_b runs only for batches of more than one image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.act(self.conv_a(x))
        if x.shape[0] > 1:
            y = self.conv_b(y)
        return self.out(y)


def seeded(factory, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # deterministic init, global RNG untouched
        torch.manual_seed(seed)
        return factory().eval()


def rand_batches(n: int, seed: int = 0, batch: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 16, 16, generator=g) for _ in range(n)]


def calibrated_small(recipe: str = "onnxruntime") -> Small:
    model = seeded(Small)
    qatkit.quantize(model, recipe, X)
    qatkit.calibrate(model, rand_batches(2), method="max")
    return model


# ---------------------------------------------------------------- recipes
def test_unknown_recipe_name_lists_builtins():
    model = Small()
    with pytest.raises(qatkit.RecipeError) as info:
        qatkit.quantize(model, "onnxruntim", X)
    msg = str(info.value)
    assert "onnxruntim" in msg and "onnxruntime" in msg and "tensorrt" in msg
    assert not hasattr(model, "_qatkit")  # nothing was attached


def test_builtin_recipes_are_listed():
    assert {"onnxruntime", "tensorrt"} <= set(qatkit.builtin_recipes())


def test_dict_recipe_unknown_nested_key_is_named():
    with pytest.raises(qatkit.RecipeError, match=r"activation\.bitz") as info:
        qatkit.load_recipe({"base": "tensorrt", "activation": {"bitz": 4}})
    assert "bits" in str(info.value)  # the valid keys are listed


def test_dict_recipe_unknown_top_level_key_is_named():
    with pytest.raises(qatkit.RecipeError, match="placment") as info:
        qatkit.load_recipe({"base": "onnxruntime", "placment": "compute_inputs"})
    assert "placement" in str(info.value)


def test_dict_recipe_override_applies():
    r = qatkit.load_recipe({"base": "tensorrt", "activation": {"bits": 6}})
    assert r.activation.bits == 6
    assert r.activation.calibrator == "mse"  # the rest of the base's activation scheme is kept
    assert r.placement == "compute_inputs"


def test_yaml_recipe_with_typo_names_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: onnxruntime\nweight: {bits: 8, per_chanel: true}\n")
    with pytest.raises(qatkit.RecipeError, match=r"weight\.per_chanel") as info:
        qatkit.quantize(Small(), path, X)
    assert "mine" in str(info.value)


def test_yaml_recipe_loads_from_path(tmp_path):
    path = tmp_path / "w6.yaml"
    path.write_text("base: onnxruntime\nweight: {bits: 6}\n")
    r = qatkit.load_recipe(str(path))
    assert r.name == "w6" and r.weight.bits == 6 and r.weight.per_channel


def test_yaml_recipe_that_is_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("activation: {bits: 8\n  - ]\n")
    with pytest.raises(qatkit.RecipeError, match="YAML"):
        qatkit.load_recipe(path)


def test_missing_yaml_recipe_file(tmp_path):
    with pytest.raises(qatkit.RecipeError, match="does not exist"):
        qatkit.load_recipe(tmp_path / "nope.yaml")


def test_invalid_placement_value():
    with pytest.raises(qatkit.RecipeError, match="placement") as info:
        qatkit.load_recipe({"base": "onnxruntime", "placement": "everywhere"})
    assert "everywhere" in str(info.value)


def test_invalid_bits_value_names_field():
    with pytest.raises(qatkit.RecipeError, match=r"activation\.bits"):
        qatkit.load_recipe({"base": "onnxruntime", "activation": {"bits": 17}})


def test_unknown_base_recipe():
    with pytest.raises(qatkit.RecipeError, match="nosuchbase") as info:
        qatkit.load_recipe({"base": "nosuchbase", "placement": "compute_inputs"})
    assert "onnxruntime" in str(info.value)


def test_recipe_errors_are_value_errors_and_qatkit_errors():
    with pytest.raises(ValueError):
        qatkit.load_recipe("nope")
    with pytest.raises(qatkit.QatkitError):
        qatkit.load_recipe(42)


# ---------------------------------------------------------------- calibration data
def test_calibrate_with_no_batches():
    model = seeded(Small)
    qatkit.quantize(model, "tensorrt", X)
    with pytest.raises(qatkit.DataError, match="no batches"):
        qatkit.calibrate(model, [])
    assert qatkit.uncalibrated(model)  # nothing was set


@pytest.mark.parametrize("recipe, value, word, good_before", [
    ("tensorrt", float("nan"), "NaN", 0),
    ("onnxruntime", float("inf"), "Inf", 1),
])
def test_calibrate_with_non_finite_batch_names_batch(recipe, value, word, good_before):
    model = seeded(Small)
    qatkit.quantize(model, recipe, X)
    bad = torch.rand(1, 3, 16, 16)
    bad[0, 1, 2, 3] = value
    with pytest.raises(qatkit.DataError, match=f"batch {good_before}") as info:
        qatkit.calibrate(model, rand_batches(good_before) + [bad], method="max")
    assert word in str(info.value)
    assert model.training is False  # the mode is restored (it was eval)
    # the failed calibration leaves the quantizers usable for a retry
    qatkit.calibrate(model, rand_batches(1), method="max")
    assert qatkit.uncalibrated(model) == []


def test_calibrate_unquantized_model():
    with pytest.raises(qatkit.QatkitError, match="quantize"):
        qatkit.calibrate(Small(), rand_batches(1))


def test_calibrate_unknown_method_is_a_qatkit_error():
    model = seeded(Small)
    qatkit.quantize(model, "tensorrt", X)
    with pytest.raises(qatkit.QatkitError, match="nosuch"):
        qatkit.calibrate(model, rand_batches(1), method="nosuch")


def test_calibrate_unknown_method_names_valid_methods():
    model = seeded(Small)
    qatkit.quantize(model, "tensorrt", X)
    with pytest.raises(ValueError, match="nosuch") as info:
        qatkit.calibrate(model, rand_batches(1), method="nosuch")
    assert "mse" in str(info.value) and "percentile" in str(info.value)


class PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_error_inside_an_observer_leaves_no_torch_function_mode_behind():
    # the conv's output quantizer observes in the conv's post-hook, where the run time steps its mode off the stack
    model = seeded(Small)
    qatkit.quantize(model, "onnxruntime", X)
    with torch.no_grad():
        model.conv1.weight.fill_(1.0)
    bad = torch.full((1, 3, 16, 16), 3e38)  # finite, but conv1's sum overflows to inf inside the model
    with PassThrough() as users:  # a mode of the user's, under qatkit's
        with pytest.raises(qatkit.DataError, match="non-finite"):
            qatkit.calibrate(model, [bad], method="max")
        assert torch._C._len_torch_function_stack() == 1
        assert torch._C._get_function_stack_at(0) is users
    qatkit.calibrate(model, rand_batches(1), method="max")
    assert qatkit.uncalibrated(model) == []


@pytest.mark.parametrize("recipe", ["onnxruntime", "tensorrt"])
def test_quantizer_that_saw_no_data_is_named(recipe):
    model = seeded(Branchy)
    qatkit.quantize(model, recipe, (torch.zeros(2, 3, 16, 16),))  # captured with conv_b on the path
    state = qatkit.quantization_state(model)
    site = state.sites["conv_b"]
    expected = [k for k in [*site.inputs.values(), site.output] if k is not None and not state.q(k).dynamic]
    assert expected  # conv_b's site has at least one activation quantizer
    with pytest.raises(qatkit.NotCalibratedError) as info:
        qatkit.calibrate(model, rand_batches(2, batch=1), method="max")  # batch 1: conv_b never runs
    msg = str(info.value)
    for name in expected:
        assert name in msg, (name, msg)
    # quantizers that did see data are not blamed
    seen = [q.name for q in state.quantizers.values() if not q.dynamic and q.name not in expected]
    assert seen
    for name in seen:
        assert name not in msg, (name, msg)
    # calibrating with batches that take that path works
    qatkit.calibrate(model, rand_batches(2, batch=2), method="max")
    assert qatkit.uncalibrated(model) == []


# ---------------------------------------------------------------- export / verify
def test_export_before_calibration(tmp_path):
    model = seeded(Small)
    qatkit.quantize(model, "onnxruntime", X)
    path = tmp_path / "m.onnx"
    with pytest.raises(qatkit.NotCalibratedError, match="calibrate"):
        qatkit.export_onnx(model, X, path)
    assert not path.exists()


def test_forward_before_calibration_names_a_quantizer():
    model = seeded(Small)
    qatkit.quantize(model, "onnxruntime", X)
    with pytest.raises(qatkit.NotCalibratedError, match="calibrate") as info:
        model(*X)
    assert "input0" in str(info.value)  # the first quantizer on the path: the model input's


def test_verify_with_no_batches(tmp_path):
    model = calibrated_small()
    path = qatkit.export_onnx(model, X, tmp_path / "m.onnx")
    with pytest.raises(qatkit.DataError, match="no batches"):
        qatkit.verify(model, path, [])


# ---------------------------------------------------------------- quantize misuse
def test_quantize_twice():
    model = seeded(Small)
    qatkit.quantize(model, "onnxruntime", X)
    with pytest.raises(qatkit.QatkitError, match="already quantized"):
        qatkit.quantize(model, "tensorrt", X)
    assert qatkit.quantization_state(model).recipe["name"] == "onnxruntime"  # unchanged


def test_quantize_without_example_inputs():
    model = Small()
    with pytest.raises(qatkit.QatkitError, match="example_inputs"):
        qatkit.quantize(model, "onnxruntime")
    assert not hasattr(model, "_qatkit")


def test_quantization_state_of_float_model():
    with pytest.raises(qatkit.QatkitError, match="not quantized"):
        qatkit.quantization_state(Small())


# ---------------------------------------------------------------- checkpoints
def test_load_onto_another_class(tmp_path):
    path = qatkit.save(calibrated_small(), tmp_path / "c.pt")
    with pytest.raises(qatkit.CheckpointError, match="Small") as info:
        qatkit.load(Other(), path)
    assert "Other" in str(info.value)


def test_load_onto_other_widths(tmp_path):
    path = qatkit.save(calibrated_small(), tmp_path / "c.pt")
    with pytest.raises(qatkit.CheckpointError, match="does not match") as info:
        qatkit.load(lambda: Small(width=6), path)
    assert "conv1.weight" in str(info.value) or "differ" in str(info.value)


def test_load_random_bytes(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(1),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(qatkit.CheckpointError, match="not a readable checkpoint"):
        qatkit.load(Small, path)


def test_load_plain_state_dict(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(Small().state_dict(), path)
    with pytest.raises(qatkit.CheckpointError, match="not a qatkit"):
        qatkit.load(Small, path)


def test_load_missing_file(tmp_path):
    with pytest.raises(qatkit.CheckpointError, match="does not exist"):
        qatkit.load(Small, tmp_path / "absent.pt")


def test_save_of_float_model(tmp_path):
    with pytest.raises(qatkit.QatkitError, match="not quantized"):
        qatkit.save(Small(), tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("recipe", ["onnxruntime", "tensorrt"])
def test_save_load_round_trip(tmp_path, recipe):
    model = calibrated_small(recipe)
    with torch.no_grad():  # make the weights differ from a fresh init, so loading has to restore them
        model.conv2.weight.mul_(1.5)
        model.bn1.running_mean.add_(0.1)
    path = qatkit.save(model, tmp_path / "c.pt", metadata={"epoch": 3})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "qatkit-quantized-1"
    assert ckpt["model_class"].endswith("Small")
    assert ckpt["metadata"] == {"epoch": 3}
    loaded = qatkit.load(Small, path)  # a factory
    assert type(loaded) is Small
    assert qatkit.uncalibrated(loaded) == []
    assert qatkit.quantization_state(loaded).recipe == qatkit.quantization_state(model).recipe
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a float module instance works too
    again = qatkit.load(seeded(Small, seed=7), path)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
