"""Resumable training checkpoints: everything a run needs to continue exactly where it was.

``<output_dir>/checkpoints/step-<N>/`` holds
- ``model/``: LoRA adapter, encoder and kmerge config (``KMergeModel.save_pretrained``, so
  ``kmerge eval --checkpoint .../model`` works on it);
- accelerate's state (``Accelerator.save_state``): optimizer, scheduler, grad scaler and every
  process's RNG states (python, numpy, torch, CUDA); with FSDP also its shards of every weight
  and of the optimizer state, which ``load_state`` restores;
- ``trainer_state.json``: step, curriculum stage, data position, the run's settings, history;
- ``COMPLETE``: written last, listing every file with its size.

A checkpoint is written under a temporary name and renamed into place, so a killed run leaves
either the whole checkpoint or a directory whose name starts with a dot. Only ``step-*``
directories whose files all match ``COMPLETE`` are ever loaded; dot directories are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from kmerge.errors import KMergeConfigError
from kmerge.modeling import ENCODER_FILE, KMergeModel

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
PREFIX = "step-"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, state: dict, keep: int
) -> Path:
    """Write ``root/step-<step>`` atomically and keep only the newest ``keep`` checkpoints.
    Every process must call it (each one saves its own RNG states)."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
        _write_marker(tmp)
        if final.exists():  # an older run's checkpoint of the same step: replace it
            _discard(final)
        os.rename(tmp, final)
        _fsync(root)
        for old in complete_checkpoints(root)[:-keep]:
            _discard(old)
        for leftover in root.glob(".*"):  # temporary or half-deleted directories of killed runs
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    """The trainer state of a complete checkpoint; an incomplete one is refused. The rest is
    restored by ``accelerator.load_state(path)`` (with ``store_model_as_adapter``)."""
    problem = incomplete_reason(path)
    if problem:
        raise KMergeConfigError(f"checkpoint {path} is incomplete ({problem}); not loading it")
    return json.loads((path / STATE_FILE).read_text())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    found = complete_checkpoints(root, warn=True)
    return found[-1] if found else None


def complete_checkpoints(root: Path, warn: bool = False) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; incomplete ones are left out."""
    complete = []
    for path in sorted(root.glob(f"{PREFIX}*")):  # zero-padded steps sort as numbers
        problem = incomplete_reason(path)
        if problem is None:
            complete.append(path)
        elif warn:
            warnings.warn(f"ignoring incomplete checkpoint {path}: {problem}", stacklevel=2)
    return complete


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is one."""
    marker = path / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} file, so it was never finished"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return f"unreadable {MARKER_FILE} file"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def weights_sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the model's weights (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def save_model(accelerator: Accelerator, model, directory: Path) -> None:
    """``save_pretrained`` of the prepared ``model`` (adapter + encoder), written by the main
    process. With sharded weights every process must call it: the full weights are gathered."""
    state_dict = accelerator.get_state_dict(model) if weights_sharded(accelerator) else None
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict)


def store_model_as_adapter(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` keep the model as ``model/`` (adapter + encoder)
    instead of accelerate's copy of every weight, the frozen base model's included.

    FSDP saves and restores its shards of every weight itself (``model/`` is written next to
    them, for ``kmerge eval``); DeepSpeed stores the model with its own engine: left as is."""
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return

    def save(models: list, weights: list, output_dir: str) -> None:
        (model,) = models
        save_model(accelerator, model, Path(output_dir) / MODEL_DIR)
        weights.clear()

    def load(models: list, input_dir: str) -> None:
        load_trainable(accelerator.unwrap_model(models.pop()), Path(input_dir) / MODEL_DIR)

    accelerator.register_save_state_pre_hook(save)
    if not weights_sharded(accelerator):
        accelerator.register_load_state_pre_hook(load)


def load_trainable(model: KMergeModel, directory: Path) -> None:
    """Copy the adapter and encoder weights saved by ``save_pretrained`` into ``model``."""
    result = set_peft_model_state_dict(
        model.peft_model, load_file(directory / "adapter_model.safetensors")
    )
    if result.unexpected_keys:
        raise KMergeConfigError(
            f"checkpoint {directory} holds adapter weights this model does not have: "
            f"{', '.join(result.unexpected_keys[:3])}"
        )
    model.encoder.load_state_dict(load_file(directory / ENCODER_FILE))


def _write_marker(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for file in files:  # on disk before the marker says so (a power cut, not only a kill)
        _fsync(file)
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in files}
    (directory / MARKER_FILE).write_text(json.dumps({"files": sizes}, indent=1) + "\n")
    _fsync(directory / MARKER_FILE)
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a checkpoint; renamed first so that a kill midway never leaves a ``step-*``
    directory with some files gone."""
    trash = path.with_name(f".del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
