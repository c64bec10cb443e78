"""Format versions: checkpoints and recipes say which version they are; older and newer ones name the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qatkit
from qatkit.apps import stages
from qatkit.checkpoint import FORMAT
from qatkit.apps.runconfig import DEMO_FLOAT


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = qatkit.quantize(Small().eval(), "onnxruntime", (torch.rand(1, 3, 8, 8),))
    qatkit.calibrate(model, [torch.rand(2, 3, 8, 8)], method="max")
    return qatkit.save(model, tmp_path / "q.pt")


def with_format(path, fmt: str):
    ckpt = torch.load(path, weights_only=True)
    ckpt["format"] = fmt
    torch.save(ckpt, path)
    return path


def test_current_checkpoint_records_its_format_and_the_qatkit_version_and_loads(checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["format"] == FORMAT == "qatkit-quantized-1"
    assert ckpt["qatkit_version"] == qatkit.__version__
    assert not qatkit.uncalibrated(qatkit.load(Small, checkpoint))


def test_a_checkpoint_without_the_version_stamp_still_loads(checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt["qatkit_version"]  # as files written before the stamp existed
    torch.save(ckpt, checkpoint)
    assert not qatkit.uncalibrated(qatkit.load(Small, checkpoint))


def test_a_newer_checkpoint_says_upgrade_qatkit(checkpoint):
    with pytest.raises(qatkit.CheckpointError, match=r"format qatkit-quantized-2, written by qatkit .*newer than "
                                                     r"this qatkit .*reads \(qatkit-quantized-1\): upgrade qatkit"):
        qatkit.load(Small, with_format(checkpoint, "qatkit-quantized-2"))


def test_an_older_checkpoint_says_how_to_re_create_it(checkpoint):
    with pytest.raises(qatkit.CheckpointError, match=r"qatkit-quantized-0, older than .*cannot be converted: "
                                                     r"re-create it .*`qatkit calibrate`"):
        qatkit.load(Small, with_format(checkpoint, "qatkit-quantized-0"))


def test_another_format_is_not_mistaken_for_a_version(checkpoint):
    with pytest.raises(qatkit.CheckpointError, match=r"is not a qatkit-quantized-1 checkpoint .*'qatkit-float-1'"):
        qatkit.load(Small, with_format(checkpoint, "qatkit-float-1"))


def test_float_checkpoint_versions(tmp_path):
    assert isinstance(stages.load_float(DEMO_FLOAT), nn.Module)  # the shipped qatkit-float-1 file
    for version, message in ((0, r"older than .*`qatkit train-float`"), (9, r"newer than .*upgrade qatkit")):
        path = tmp_path / f"float{version}.pt"
        torch.save({"format": f"qatkit-float-{version}", "config": {}, "state_dict": {}}, path)
        with pytest.raises(qatkit.CheckpointError, match=message):
            stages.load_float(path)


def test_recipe_version():
    assert qatkit.load_recipe("tensorrt").version == 1  # optional: built-ins do not state it
    assert qatkit.load_recipe({"base": "tensorrt", "version": 1}).version == 1
    with pytest.raises(qatkit.RecipeError, match=r"recipe version 2 is newer .*upgrade qatkit"):
        qatkit.load_recipe({"base": "tensorrt", "version": 2})
    for bad in (0, "v1", True):
        with pytest.raises(qatkit.RecipeError, match=r"unknown recipe version .*valid versions: 1"):
            qatkit.load_recipe({"base": "tensorrt", "version": bad})


def test_recipe_version_is_saved_with_the_checkpoint(checkpoint):
    assert torch.load(checkpoint, weights_only=True)["recipe"]["version"] == 1
