"""DDP on CPU (gloo) for processes launched by ``torchrun``, which ultralytics' trainer does not do by itself.

Ultralytics counts devices from ``device`` ("0,1"): on CPU its world size is 0, so a ``torchrun --nproc_per_node 2``
launch would train two independent copies. With :func:`torchrun_world` > 1 and a CPU device, the QAT trainer
instead joins a gloo process group (:func:`join_process_group`), shards the data with ultralytics' distributed
samplers (its loaders shard whenever ``LOCAL_RANK`` is set) and wraps the model with :func:`wrap` (no
``device_ids``: DDP rejects them for CPU modules, which is why ultralytics' own wrap cannot be used).
"""
from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch.distributed as dist
from torch import nn

from ...errors import QatkitError


def torchrun_world() -> int:
    """The world size ``torchrun`` (or ``python -m torch.distributed.run``) set for this process; 1 without it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise QatkitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer: launch with torchrun "
                          "--nproc_per_node N") from None


def join_process_group(world: int) -> bool:
    """Initialise the default process group with gloo from torchrun's environment; False if one already exists.

    Args:
        world: the expected world size (checked against torchrun's).

    Raises:
        QatkitError: torchrun's rendezvous variables are missing.

    Example:
        >>> created = join_process_group(torchrun_world())  # doctest: +SKIP
    """
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise QatkitError(f"a process group of {dist.get_world_size()} ranks exists, but WORLD_SIZE={world}")
        return False
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise QatkitError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch every rank with torchrun "
                          "--nproc_per_node N your_script.py (it sets them)")
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world, timeout=timedelta(hours=3))
    return True


def wrap(model: nn.Module) -> nn.parallel.DistributedDataParallel:
    """``model`` in DDP for CPU training: no device ids, buffers not re-broadcast at each forward (as ultralytics).

    qatkit's hooks stay on ``model`` and run inside DDP's forward; qatkit all-reduces the moving activation ranges
    itself, so every rank keeps the same quantizer state.

    Example:
        >>> trainer.model = wrap(trainer.model)  # doctest: +SKIP
    """
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})  # torch 2.13 renamed it (ultralytics passes the same)
    return ddp(model, find_unused_parameters=True, **no_sync)
