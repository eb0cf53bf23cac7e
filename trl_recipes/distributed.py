"""Process groups of a launched run: gloo for DeepSpeed on CPUs, and a run's orderly end on every rank."""

from __future__ import annotations

import os


def init_distributed_on_cpu() -> bool:
    """Under a DeepSpeed launcher without GPUs, start the process group on gloo before anything reads the world size
    (TRL's argument parsing fills DeepSpeed's "auto" batch sizes from it, and ZeRO-3 partitions at model load).

    accelerate finds no backend on a CPU-only DeepSpeed launch and would count one process, so the shared state is
    created here with gloo; the caller then tells TrainingArguments to use it instead of resetting it."""
    import torch

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true" or torch.cuda.is_available():
        return False
    import deepspeed
    from accelerate import PartialState

    deepspeed.init_distributed(dist_backend="gloo")
    PartialState(backend="gloo")
    return True


def end_processes(state) -> None:
    """The other ranks leave together with the main one (gloo aborts on a ragged exit); the group is destroyed."""
    import torch

    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
