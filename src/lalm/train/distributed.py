"""Data-parallel training under torchrun: process group, FSDP2 wrapping, gradient averaging.

`torchrun --nproc_per_node=N -m lalm train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
`lalm train` is world size 1 and never touches torch.distributed. CPUs talk over gloo (tests),
GPUs over NCCL. Without `--fsdp` every rank holds the whole model and gradients are averaged
after the backward passes of a step; with `--fsdp` every decoder and encoder block, then the
root, is wrapped with FSDP2 `fully_shard`, which shards parameters, gradients and AdamW state
and reduce-scatters (averages) gradients itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lalm.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Anything else ("cuda:0", "gpu", "mps") used to fall through to a CPU run without a word.
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {device!r} is not auto, cpu or cuda (torchrun's LOCAL_RANK picks the GPU)")
    if device == "cuda" and not torch.cuda.is_available():  # else torch's own error, from set_device
        raise ConfigError("device: cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local_rank, dev)


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a few scalars over ranks (token counts, loss sums for logging)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(d: Dist, obj):
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(d: Dist, params: list[torch.nn.Parameter]) -> None:
    """Mean of every gradient over ranks (the plain data-parallel path; FSDP does this itself).

    One flat buffer instead of one all_reduce per tensor: hundreds of tiny collectives would
    cost more in latency than the transfer.
    """
    if not d.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(d: Dist, model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (random init differs across processes)."""
    if not d.active:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def apply_fsdp(model: torch.nn.Module, device: torch.device | None = None) -> None:
    """FSDP2: shard each encoder and decoder block, then the rest (embeddings, head) at the root,
    onto `device`'s type. fully_shard's own default mesh is the build's accelerator, so a CPU run
    (gloo) on a CUDA build would have had its shards moved to a GPU beside CPU batches."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if device is not None else None
    for layer in model.audio_tower.layers:
        fully_shard(layer, mesh=mesh)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Gather the whole model and AdamW state on rank 0 (CPU); other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                          optim_sd: dict | None) -> None:
    """Inverse of full_state_dicts: rank 0's full tensors are broadcast and re-sharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def all_sum_tensor(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if not d.active:
        return t
    t = t.to(d.device).clone()
    dist.all_reduce(t)
    return t.cpu()


def full_tensors(d: Dist, named) -> dict[str, torch.Tensor]:
    """{name: whole CPU tensor} on rank 0 ({} elsewhere). Under FSDP each sharded tensor is
    all-gathered in turn (a collective: every rank iterates the same names in the same order),
    so only one whole tensor at a time sits on the accelerator."""
    out = {}
    for name, t in named:
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if d.main:
            out[name] = t.cpu().clone().contiguous()
    return out
