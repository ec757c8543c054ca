"""Data-parallel training over several processes (`torchrun`): who this process is, the
process group, and the work only rank 0 does.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process.
Without them (or with WORLD_SIZE=1) every function here is a no-op and training stays the
single-process code path. With WORLD_SIZE > 1 the process group starts on first use: gloo for
CPU tensors, NCCL for CUDA tensors where a GPU is present.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import Callable, TypeVar

import numpy as np

from bonmf_core.errors import ConfigError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def rank() -> int:
    return int(os.environ.get("RANK") or 0)


def enabled() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Join the process group (once) when WORLD_SIZE > 1 → whether distributed.

    A WORLD_SIZE > 1 without the rest of torchrun's variables is refused: silently training
    alone would pass N independent copies of one run off as one distributed run.
    """
    if not enabled():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    missing = [v for v in TORCHRUN_VARIABLES if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size()} but {', '.join(missing)} not set: start "
                          f"a distributed run with `torchrun --nproc_per_node "
                          f"{world_size()} ...`, or unset WORLD_SIZE to train in one process")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK") or 0))
        backend = "cpu:gloo,cuda:nccl"   # each collective goes to its tensors' device
    dist.init_process_group(backend=backend)
    atexit.register(teardown)
    return True


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (any picklable object); `obj` itself in one process."""
    if not init():
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank; the others wait meanwhile."""
    if not init():
        return fn()
    return broadcast(fn() if is_main() else None)


def barrier() -> None:
    if init():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block, then the others do: e.g. rank 0 fills a cache (generated demo
    pictures, content embeddings) that the others then read instead of writing it too."""
    if not init():
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_sum(value: float) -> float:
    if not init():
        return value
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def rank_seed(seed: int) -> int:
    """`seed` on rank 0; a different, reproducible seed on every other rank (dropout masks
    should differ between ranks, as they differ between the parts of one big batch)."""
    r = rank()
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def wrap(model):
    """`model` in DistributedDataParallel (which copies rank 0's weights to all ranks once).
    Buffers (content features, PCA bases, the warm mask) are constant: not re-sent each step."""
    from torch.nn.parallel import DistributedDataParallel

    init()
    device = next(model.parameters()).device
    return DistributedDataParallel(model, forward_sync_buffers=False,
                                   device_ids=[device.index] if device.type == "cuda" else None)
