"""The accelerate side of a run: the Accelerator for one process or a launch, and what sharded
weights (FSDP2) need from kmerge's own code."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from kmerge.errors import KMergeConfigError


def native_bf16() -> bool:
    """Whether this machine computes in bf16 natively: a CUDA GPU that supports it, else a CPU
    with AVX512-BF16 or AMX (other CPUs emulate bf16, slower than fp32). Other accelerators: no,
    not known here."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if gpu_available():
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_mixed_precision(requested: str | None) -> str | None:
    """``auto``: bf16 where this machine computes it natively (``native_bf16``), else no. An
    explicit bf16 on a CPU without it is kept, with a warning: it runs, but slower."""
    if requested == "bf16" and not gpu_available() and not native_bf16():
        warnings.warn(
            "mixed_precision='bf16' on a CPU without native bf16 (no AVX512-BF16 or AMX): it "
            "is emulated, slower than fp32; 'auto' picks bf16 only where it is native",
            stacklevel=2,
        )
    if requested != "auto":
        return requested
    return "bf16" if native_bf16() else "no"


def make_accelerator(mixed_precision: str | None, grad_accum: int, batch_size: int) -> Accelerator:
    """The Accelerator of this process (one of a launch, or alone), checked: a launch that
    accelerate did not set up as one, or a sharding engine kmerge does not drive, is refused.
    ``mixed_precision="auto"``: see ``resolve_mixed_precision``."""
    mixed_precision = resolve_mixed_precision(mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Without a GPU, accelerate runs the processes of a multi-process launch as unrelated single
    # processes unless told to use the CPU; then they train together over gloo.
    cpu = launched > 1 and not gpu_available()
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=grad_accum,
            step_scheduler_with_optimizer=False,  # stepped by hand, once per optimizer step
        )
    except ValueError as err:  # e.g. fp16 without a GPU
        raise KMergeConfigError(f"mixed_precision={mixed_precision!r}: {err}") from None
    if launched > 1 and accelerator.num_processes == 1:
        raise KMergeConfigError(
            f"launched as {launched} processes but accelerate set up a single one "
            f"({accelerator.distributed_type}); check the accelerate config"
        )
    check_sharding(accelerator)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed:  # DeepSpeed wants the batch size at the model's prepare(), before any loader
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    return accelerator


def check_sharding(accelerator: Accelerator) -> None:
    """Refuse the weight-sharding engines kmerge does not drive: FSDP1 (kmerge gathers the
    FSDP2 root module's weights for its own code, ``root_unsharded``) and DeepSpeed ZeRO-3
    (neither its lockstep generation nor its gathered export is wired up)."""
    fsdp = accelerator.state.fsdp_plugin if weights_sharded(accelerator) else None
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise KMergeConfigError(
            f"FSDP version {fsdp.fsdp_version} is not supported: set fsdp_version: 2 in the "
            "accelerate config (examples/accelerate/fsdp.yaml)"
        )
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed and deepspeed.zero_stage == 3:
        raise KMergeConfigError(
            "DeepSpeed ZeRO-3 is not supported; use FSDP (examples/accelerate/fsdp.yaml) to "
            "shard the weights, or ZeRO-2 (docs/distributed.md)"
        )


def weights_sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the model's weights (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def root_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Gather the FSDP root module's own weights (embeddings, merge encoder, LM head) for the
    code that runs outside its forward pass: evaluation prepares batches and generates through
    the unwrapped model. The decoder layers, wrapped on their own, gather theirs in each of
    their forward passes, together with the other processes."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce the gradients of ``model``'s trainable weights to their mean over the
    processes, in one flat buffer. For the backward passes DDP does not see: the distiller
    calls the unwrapped model (DDP syncs only after a forward through its wrapper), and its
    match-only steps leave layers without gradients, which DDP's own sync refuses. The
    weights without a gradient are the same on every process (same step, same code path)."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def gpu_available() -> bool:
    devices = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every device type
    return devices.is_available() if devices else torch.cuda.is_available()
