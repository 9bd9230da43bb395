"""Beyond one device: process group from torchrun's environment, FSDP2 sharding, host-side collectives (count
all-reduce, small objects). Checkpoints, sharded or not, are `fastsft.train.checkpoint`'s.

Sits between model construction and the trainer loop (`fastsft.train.trainer`): the model itself knows nothing of
distribution; `shard_model` applies `torch.distributed.fsdp.fully_shard` to each transformer block and then the root
from outside (as torchtitan does).

Launch: `torchrun --nproc_per_node 8 -m fastsft train ...` (or `fastsft train` started by torchrun: RANK/WORLD_SIZE
in the environment turn this on). Multi-node, the same command on every node with torchrun's rendezvous flags:

    torchrun --nnodes 2 --nproc_per_node 8 --node_rank <0|1> --rdzv_backend c10d \\
             --rdzv_endpoint <host of node 0>:29500 --rdzv_id <any job id> -m fastsft train --config run.yaml

(or `--master_addr/--master_port` with a static `--node_rank`). OUT must be on a filesystem every node sees: every
rank writes its shard of a checkpoint into one directory.

Loss equivalence: each rank's loss is its summed token loss divided by the GLOBAL count of supervised tokens of the
optimizer step (all micro-batches, all ranks); FSDP's gradient reduction is set to a plain sum (divide factor 1), so
the summed gradient equals the gradient of the one-device loss over the same tokens. The counts are host integers the
loader already knows; they are all-reduced over a gloo group on CPU tensors, so no device sync is needed.

Backends: nccl on CUDA (plus a gloo group for the host counts), gloo on CPU. FSDP2 runs on CPU with gloo in this
torch build (the 2-process test in tests/test_distributed.py runs it).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, its device; `enabled` is False for a plain one-process run."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    host_group: object = None  # gloo process group for CPU-tensor collectives (the default group on CPU runs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' without CUDA is an error."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device; use train.device=cpu or auto")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialize the process group when launched by torchrun with WORLD_SIZE > 1; else a one-process DistInfo."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo(device=pick_device(device_preference))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return DistInfo(True, rank, world_size, local_rank, device, backend, host_group)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.host_group)


def all_reduce_host(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few host numbers over all ranks (CPU tensor, gloo: no device sync). Identity on one process."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.host_group)
    return t.tolist()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a device tensor over ranks (used once per logging interval / evaluation)."""
    if info.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's small Python object, in rank order, on every rank ([obj] on one process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.host_group)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's Python object on every rank (small things: a checkpoint path, a prepared data directory)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.host_group)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------------
# FSDP2


def shard_model(model: torch.nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """fully_shard each transformer block, then the root (embeddings, final norm, head), in place.

    param_dtype: compute dtype of the all-gathered parameters (bf16 on GPU); gradients are reduced in fp32 and the
    sharded master parameters keep the model's dtype. The gradient reduction is a SUM (see the module docstring).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fastsft.adapters.lora import check_nf4_shardable

    check_nf4_shardable(model, info.world_size)
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        # The last block is gathered again right away by backward, so keeping it unsharded saves one all-gather.
        fully_shard(block, mp_policy=mp_policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp_policy)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # A plain SUM (no division, no PREMUL_SUM, which gloo lacks): each rank's loss is already divided by
            # the global token count.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model
