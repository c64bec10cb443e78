"""DDP on CPU (gloo, 2 processes): calibration statistics are reduced across ranks, so both ranks get identical
scales, equal to one process calibrating on the union of their data; EMA ranges stay in sync during QAT."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import qatkit

METHODS = ["max", "percentile", "mse", "entropy"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.out(torch.cat([y, self.b(y) + y], 1))


def data(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, with different ranges
    return [torch.randn(2, 3, 12, 12, generator=g) * (1 + rank + i) for i in range(3)]


def model(recipe) -> nn.Module:
    torch.manual_seed(0)
    return qatkit.quantize(Net().eval(), recipe, (torch.rand(1, 3, 12, 12),))


def scales(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: q.scale.detach().clone() for k, q in qatkit.quantization_state(m).quantizers.items() if not q.dynamic}


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {}
        for method in METHODS:
            m = model("onnxruntime")
            qatkit.calibrate(m, data(rank), method=method)
            result[method] = scales(m)
        # QAT with EMA ranges under the user's own DDP wrapper: ranges move alike on both ranks
        m = model("npu-uint8")
        qatkit.calibrate(m, data(rank), method="max")
        net = DDP(m.train())
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for x in data(rank):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        result["ema_after_qat"] = scales(m)
        out[rank] = result
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        return dict(out)


def test_both_ranks_get_identical_scales(ranks):
    for key in METHODS + ["ema_after_qat"]:
        for name, s in ranks[0][key].items():
            assert torch.equal(s, ranks[1][key][name]), (key, name)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_calibration_equals_one_process_on_the_union(ranks, method):
    m = model("onnxruntime")
    union = [torch.cat([a, b]) for a, b in zip(data(0), data(1))]  # step k of both ranks as one batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a float conv's last bit depends on its thread split, and the max is exact
    try:
        qatkit.calibrate(m, union, method=method)
    finally:
        torch.set_num_threads(threads)
    single = scales(m)
    for name, s in ranks[0][method].items():
        if method == "max":
            assert torch.equal(s, single[name]), name
        else:  # histograms merge by summing counts: equal up to float64 rounding of re-binning
            torch.testing.assert_close(s, single[name], rtol=1e-6, atol=0), name
