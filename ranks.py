"""Several processes under torchrun: this process's rank and device, sums, means and flags
across ranks, and every rank's random state for last.pt. With one process each is the
identity, and torch.distributed is never imported. Knows nothing of models or losses.
"""
from __future__ import annotations

import os

import torch


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: gloo on CPU, NCCL on GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world_size == 1:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives (rng_states) use the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def sum_across_ranks(value: float, world_size: int, device: torch.device) -> float:
    if world_size == 1:
        return value
    import torch.distributed as dist
    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor)
    return type(value)(tensor.item())


def mean_across_ranks(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if world_size == 1:
        return values
    import torch.distributed as dist
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor)
    return (tensor / world_size).tolist()


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank if it is True on one: all ranks stop at the same step."""
    if world_size == 1:
        return flag
    import torch.distributed as dist
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def rng_states(world_size: int, device: torch.device) -> list[dict]:
    """Every rank's random state (its LoRA dropout masks), gathered for rank 0 to save."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world_size == 1:
        return [state]
    import torch.distributed as dist
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
