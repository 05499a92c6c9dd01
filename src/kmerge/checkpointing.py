"""Resumable training checkpoints: everything a run needs to continue exactly where it was.

``<output_dir>/checkpoints/step-<N>/`` holds
- ``model/``: LoRA adapter, encoder and kmerge config (``KMergeModel.save_pretrained``, so
  ``kmerge eval --checkpoint .../model`` works on it);
- accelerate's state (``Accelerator.save_state``): optimizer, scheduler, grad scaler and every
  process's RNG states (python, numpy, torch, CUDA); with FSDP also its shards of every weight
  and of the optimizer state, which ``load_state`` restores;
- ``trainer_state.json``: step, curriculum stage, data position, the run's settings, and how
  many records the run had logged to ``metrics.jsonl`` (the log itself is not copied into every
  checkpoint: a resumed run keeps that many of its records, :func:`read_history`);
- ``COMPLETE``: written last, listing every file with its size.

A checkpoint is written under a temporary name and renamed into place, so a killed run leaves
either the whole checkpoint or a directory whose name starts with a dot. Only ``step-*``
directories whose files all match ``COMPLETE`` are ever loaded; dot directories are removed.
The rotation (the newest ``keep`` kept) is written here, not left to accelerate's
``ProjectConfiguration(automatic_checkpoint_naming, total_limit)``: that deletes the oldest
checkpoints *before* writing the new one, counts incomplete ones and writes in place, so a kill
during the save could leave no complete checkpoint at all.

:class:`Checkpointer` is the run's side: when to checkpoint, SIGINT/SIGTERM (finish the step,
checkpoint, stop), and resuming with the settings checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from kmerge.distributed import weights_sharded
from kmerge.errors import KMergeConfigError
from kmerge.modeling import ENCODER_FILE, KMergeModel
from kmerge.provenance import differences, with_defaults

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
PREFIX = "step-"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a whole step; ``checkpoint`` holds everything
    needed to continue it with ``resume=True``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint {checkpoint} (continue with --resume)"
        )


class Checkpointer:
    """A run's resumable checkpoints under ``<output_dir>/checkpoints``: one every ``save_every``
    steps and one when SIGINT/SIGTERM asks the run to stop, the newest ``keep`` kept.
    ``identity``: what a run that resumes a checkpoint must agree on with the run that wrote it;
    ``defaults``: the same for default settings, standing in for settings that a checkpoint
    written by an older kmerge lacks (they ran at their defaults then). Every process makes
    the same calls (each saves its own RNG states)."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path | None,
        identity: dict,
        save_every: int = 0,
        keep: int = 2,
        defaults: dict | None = None,
    ) -> None:
        self.accelerator, self.identity = accelerator, identity
        self.defaults = defaults or {}
        self.root = checkpoints_dir(output_dir) if output_dir else None
        self.save_every, self.keep = save_every, keep
        self.latest: Path | None = None  # the newest checkpoint written or resumed from
        self.signals: list[int] = []

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[None]:
        """While the loop runs (with ``save_every``): SIGINT/SIGTERM are noted instead of
        stopping the process at once, and :meth:`after_step` checkpoints and stops."""
        if not self.save_every:  # no checkpoints: signals act as usual
            yield
            return
        with stop_requests() as received:
            self.signals = received
            yield

    def after_step(self, step: int, progress: Callable[[], dict]) -> None:
        """Checkpoint ``progress()`` if ``step`` is due or a signal came; after a signal, raise
        :class:`TrainingInterrupted`."""
        signum = self._agreed_signal()
        if signum or (self.save_every and step % self.save_every == 0):
            self.save(step, progress())
        if signum:
            raise TrainingInterrupted(signum, step, self.latest)

    def save(self, step: int, progress: dict) -> Path:
        state = {"run": self.identity, "progress": progress}
        self.latest = save_checkpoint(self.accelerator, self.root, step, state, self.keep)
        return self.latest

    def resume(self, path: Path) -> dict:
        """Restore the model, optimizer, scheduler and RNG states saved at ``path`` and return
        the progress saved with them; refused if a run with other settings wrote it."""
        state = read_state(path)
        then = with_defaults(state["run"], self.defaults)
        mismatches = [
            f"{key}: {before!r} there, {now!r} here"
            for key, (before, now) in differences(then, self.identity).items()
        ]
        if mismatches:
            raise KMergeConfigError(
                f"checkpoint {path} was written by a run with other settings "
                f"({'; '.join(mismatches)}): resume with the same settings or use another "
                "output directory"
            )
        self.accelerator.load_state(path)  # model, optimizer, scheduler, RNG states
        self.latest = path
        return state["progress"]

    def _agreed_signal(self) -> int:
        """The signal received (0: none), agreed on by all processes so that they all stop
        after the same step."""
        signum = self.signals[0] if self.signals else 0
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([signum], device=self.accelerator.device)
            signum = int(self.accelerator.gather(flags).max())
        return signum


def checkpoint_to_resume(output_dir: Path | None, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to continue from (None: a fresh run); an earlier run's checkpoints are
    never overwritten by a fresh run by mistake."""
    if output_dir is None:
        return None
    root = checkpoints_dir(output_dir)
    if overwrite:  # an earlier run's checkpoints go when this run starts writing
        return None
    latest = latest_checkpoint(root) if root.is_dir() else None
    if resume and latest is None:
        raise KMergeConfigError(f"--resume: no complete checkpoint in {root} to continue from")
    if latest is not None and not resume:
        raise KMergeConfigError(
            f"{root} holds checkpoints of an earlier run (newest: {latest.name}): pass --resume "
            "to continue it, --overwrite to replace it, or use another output directory"
        )
    return latest


def read_history(metrics_file: Path, records: int, checkpoint: Path) -> list[dict]:
    """The first ``records`` records of a run's ``metrics.jsonl``: what the run had logged
    when it wrote ``checkpoint`` (the records after them, the resumed run logs again)."""
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    if len(lines) < records:
        raise KMergeConfigError(
            f"checkpoint {checkpoint} follows {records} records of {metrics_file}, which holds "
            f"{len(lines)}: the run's log was cut or replaced; use --overwrite to start again"
        )
    try:
        return [json.loads(line) for line in lines[:records]]
    except ValueError as err:
        raise KMergeConfigError(f"{metrics_file} is not valid JSON Lines ({err})") from None


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Note SIGINT/SIGTERM in a list instead of stopping at once, so that the loop can finish
    its step and checkpoint; a second signal of the same kind acts as it did before."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may set signal handlers
        return

    def note(signum: int, frame) -> None:
        received.append(signum)
        signal.signal(signum, previous[signum])

    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in kinds}
    for s in kinds:
        signal.signal(s, note)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
