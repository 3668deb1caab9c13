"""torch.distributed set-up for `torchrun`: DDP or FSDP2 on gloo (CPU) or NCCL (CUDA).

`torchrun --nproc_per_node N -m llmcore pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK; the
same command without torchrun runs one process. The batch size is the global batch: each rank
takes its own contiguous slice of every global batch. Only rank 0 writes files.

`--fsdp` (FSDP2, `fully_shard`): every transformer block is one shard group, the root (the
embeddings, final norm and head) another; each rank holds 1/world of every parameter, gradient
and optimizer state. Checkpoints stay in the one-file format of DDP runs: the full (gathered)
model and optimizer state dicts are collected on rank 0's CPU (a collective: every rank calls
the helpers below) and written by rank 0; on resume every rank reads the full files and keeps
its own shard. So an FSDP checkpoint resumes under FSDP with any world size, or without it.
With one process (no torchrun) `--fsdp` changes nothing, as DDP does not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


# ----------------------------------------------------------------------------- FSDP2

def wrap_fsdp(model: torch.nn.Module, info: DistInfo, *, bf16: bool) -> torch.nn.Module:
    """Shard `model` in place with FSDP2: one `fully_shard` per block of `model.blocks` (when
    it has them), then the root. bf16: parameters all-gathered and computed in bf16, gradients
    reduce-scattered in fp32 (the fp32 master shards stay in the optimizer). Returns `model`.

    FSDP2 hooks a module's backward through the tensors of its forward's output, found by
    pytree flattening: a model whose root does real work (here the embeddings and head) must
    return a tuple, dict or registered dataclass (`torch.export.register_dataclass`), else the
    root's gradients are silently not reduced. The blocks' hooks cover the root for the
    Transformer; tests/train/test_fsdp.py checks a root-only model with a registered output."""
    if not info.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    for block in getattr(model, "blocks", None) or ():
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Back to sharded parameters after forwards without a backward (evaluation): FSDP2 keeps
    the root unsharded after its forward, and the optimizer and state-dict helpers expect the
    sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a replicated DTensor (e.g. clip_grad_norm_'s norm under FSDP)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict:
    """The gathered model state dict on rank 0's CPU ({} on the other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The gathered optimizer state dict (keyed by parameter names) on rank 0's CPU ({} on the
    other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a full state dict (read by every rank) into a sharded or plain model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options())


def load_full_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state dict (from `full_optimizer_state`, read by every
    rank) into the optimizer of a sharded or plain model."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options())


def keyed_by_name(optimizer_state: dict) -> bool:
    """True for an optimizer state dict from `full_optimizer_state` (parameter-name keys),
    False for `optimizer.state_dict()` (integer keys)."""
    groups = optimizer_state.get("param_groups") or [{}]
    return any(isinstance(k, str) for k in groups[0].get("params", ()))
