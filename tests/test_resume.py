"""QAT runs: a run killed (SIGKILL) mid-epoch resumes from its last training-state checkpoint and ends
bit-identical to the uninterrupted run; a training state of another model is a clear error; `qatkit qat --nproc 2`
runs DDP (torchrun, gloo)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from qatkit.apps import cli
from qatkit.errors import CheckpointError
from qatkit.apps.train_loop import STATE_FORMAT

STEPS, EVERY = 40, 8  # 48 images / batch 4 = 12 steps per epoch: checkpoints fall mid-epoch


def qat_cmd(cfg, ptq, out, *extra) -> list[str]:
    return [sys.executable, "-m", "qatkit.apps.cli", "qat", "--config", str(cfg), "--checkpoint", str(ptq),
            "--out", str(out), "--steps", str(STEPS), "--checkpoint-every", str(EVERY), *extra]


@pytest.fixture(scope="module")
def ptq(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(root / "shapes"), "n_train": 48, "n_val": 8, "img_size": 96,
                                   "calib_batches": 2, "batch_size": 4, "quiet": True,
                                   "freeze_bn_step": 20}))
    assert cli.main(["calibrate", "--config", str(cfg), "--method", "max", "--out", str(root / "ptq.pt")]) == 0
    return root, cfg, root / "ptq.pt"


@pytest.mark.slow
def test_killed_qat_run_resumes_to_the_same_result(ptq):
    root, cfg, ckpt = ptq
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: reductions in one order, runs comparable bit for bit
    subprocess.run(qat_cmd(cfg, ckpt, root / "full.pt"), check=True, env=env, capture_output=True)

    out = root / "killed.pt"
    state = out.with_suffix(".state.pt")
    proc = subprocess.Popen(qat_cmd(cfg, ckpt, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not out.exists(), "the run must die after a checkpoint and before the end"
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < STEPS and step % 12 != 0  # mid-epoch

    subprocess.run(qat_cmd(cfg, ckpt, out, "--resume"), check=True, env=env, capture_output=True)
    full = torch.load(root / "full.pt", weights_only=True)["state_dict"]
    resumed = torch.load(out, weights_only=True)["state_dict"]
    assert full.keys() == resumed.keys()
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different[:5]
    assert bool(resumed["_qatkit.bn_frozen"])  # the freeze schedule (step 20) was replayed/kept


def test_a_training_state_of_another_recipe_is_an_error(ptq, tmp_path):
    root, cfg, ckpt = ptq
    state = tmp_path / "qat.state.pt"
    torch.save({"format": STATE_FORMAT, "step": 3, "model": {"foo": torch.zeros(1)}, "optimizer": {},
                "scheduler": {}, "ema": None, "ema_updates": 0, "rng": torch.get_rng_state()}, state)
    with pytest.raises(CheckpointError, match="does not belong to this model"):
        from qatkit.apps import stages
        from qatkit.apps.runconfig import load_run_config
        run = load_run_config(cfg, qat_steps=5, checkpoint_every=1)
        stages.qat(run, stages.load_quantized(ckpt).train(), stages.datasets(run)[0], state_path=state,
                   resume=True)


def test_qat_runs_under_ddp_with_two_processes(ptq):
    root, cfg, ckpt = ptq
    out = root / "ddp.pt"
    proc = subprocess.run([sys.executable, "-m", "qatkit.apps.cli", "qat", "--config", str(cfg), "--checkpoint", str(ckpt),
                           "--out", str(out), "--steps", "4", "--nproc", "2"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "QAT mAP" in proc.stdout and out.is_file()
    from qatkit.apps import stages
    stages.load_quantized(out)  # a checkpoint like any other
