"""Training that survives faults: a run killed with SIGKILL and resumed ends with exactly the
weights of an uninterrupted run; incomplete checkpoints are never loaded; SIGINT/SIGTERM finish
the step, checkpoint and stop cleanly; a NaN loss stops the run naming the step."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal

import pytest
import torch

from kmerge.checkpointing import (
    MARKER_FILE,
    MODEL_DIR,
    STATE_FILE,
    TrainingInterrupted,
    _write_marker,
    checkpoints_dir,
    complete_checkpoints,
    latest_checkpoint,
    read_history,
    read_state,
)
from kmerge.cli import main
from kmerge.errors import KMergeConfigError
from kmerge.modeling import KMergeModel
from kmerge.training import train
from tests import kmerge_process
from tests.kmerge_process import assert_same_weights, records, trainable_weights
from tests.test_training import small_run


def train_args(base, out, steps: int = 10, *extra) -> list:
    """Two curriculum stages of ``steps`` steps; 4 batches an epoch, so runs cross epochs and
    stages; a checkpoint every step."""
    argv = [
        "train", "--base-model", base, "--k", "4", "--curriculum", "small,xsmall",
        "--gate", "1.1", "--final-gate", "1.1", "--steps", steps, "--batch-size", "4",
        "--n-train", "16", "--n-eval", "4", "--eval-every", "3", "--log-every", "1",
        "--lr", "1e-2", "--warmup-steps", "2", "--lora-dropout", "0.1", "--save-every", "1",
        "--keep-checkpoints", "2",
        "--output-dir", out, *extra,
    ]  # fmt: skip
    return [str(a) for a in argv]


def test_sigkill_then_resume_ends_with_the_same_weights(tiny_dir, tmp_path):
    main(train_args(tiny_dir, tmp_path / "whole", 10, "--save-every", "1000"))

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = kmerge_process.start(train_args(tiny_dir, killed), log)
    sixth = killed / "checkpoints" / "step-00000006"  # in the stage's second epoch
    kmerge_process.wait_for(sixth.exists, proc, log, "the step-6 checkpoint")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not (killed / "checkpoint").exists(), "the run had finished before the kill"

    main(train_args(tiny_dir, killed, 10, "--resume"))
    history = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    starts = [r["resumed_from"] for r in history if "resumed_from" in r]
    assert len(starts) == 1 and int(starts[0].rsplit("-", 1)[1]) >= 6
    assert_same_weights(tmp_path / "whole" / "checkpoint", killed / "checkpoint")
    # The log carries on as if nothing had happened: every step's loss, exactly.
    assert records(killed, "loss") == records(tmp_path / "whole", "loss")
    assert len(records(killed, "loss")) == 20


def test_incomplete_checkpoints_are_never_loaded(tiny_model, tmp_path):
    cfg = small_run(tmp_path, steps=4, save_every=1, keep_checkpoints=4)
    train(cfg, model=tiny_model(4))
    root = tmp_path / "run" / "checkpoints"
    step3, step4 = root / "step-00000003", root / "step-00000004"
    # A file cut short, a directory that never got its COMPLETE marker, a killed write.
    (step4 / "optimizer.bin").write_bytes(b"cut short")
    shutil.copytree(step3, root / "step-00000005")
    (root / "step-00000005" / "COMPLETE").unlink()
    shutil.copytree(step3, root / ".tmp-step-00000006")

    with pytest.raises(KMergeConfigError, match="incomplete.*optimizer.bin has 9 bytes"):
        read_state(step4)
    with pytest.raises(KMergeConfigError, match="incomplete.*no COMPLETE file"):
        read_state(root / "step-00000005")
    with pytest.warns(UserWarning, match="ignoring incomplete checkpoint"):
        assert latest_checkpoint(root) == step3

    with pytest.warns(UserWarning):
        result = train(dataclasses.replace(cfg, resume=True), model=tiny_model(4))
    assert {"step": 3, "resumed_from": str(step3)} in result.history
    assert result.steps == 4
    assert read_state(step4)["progress"]["step"] == 4  # rewritten, now complete
    assert not list(root.glob(".*"))  # the killed write's leftovers are gone

    for path in complete_checkpoints(root):
        (path / "COMPLETE").unlink()
    with pytest.raises(KMergeConfigError, match="no complete checkpoint"):
        with pytest.warns(UserWarning):
            train(dataclasses.replace(cfg, resume=True), model=tiny_model(4))


def test_checkpoints_count_the_log_and_resume_keeps_that_much_of_it(tiny_model, tmp_path):
    cfg = small_run(tmp_path, steps=3, save_every=1, keep_checkpoints=3)
    whole = train(cfg, model=tiny_model(4)).history
    run = tmp_path / "run"
    log, step2 = run / "metrics.jsonl", run / "checkpoints" / "step-00000002"
    progress = read_state(step2)["progress"]
    assert "history" not in progress  # the log is not copied into every checkpoint
    kept = whole[: progress["records"]]
    assert kept and kept[-1]["step"] == 2 and read_history(log, len(kept), step2) == kept
    shutil.rmtree(run / "checkpoints" / "step-00000003")

    resumed = train(dataclasses.replace(cfg, resume=True), model=tiny_model(4)).history
    assert resumed[: len(kept) + 1] == [*kept, {"step": 2, "resumed_from": str(step2)}]
    clock = ("elapsed", "train_seconds")  # the records after it are logged again, new times
    again, then = resumed[len(kept) + 1 :], whole[len(kept) :]
    assert [{k: v for k, v in r.items() if k not in clock} for r in again] == [
        {k: v for k, v in r.items() if k not in clock} for r in then
    ]
    assert [json.loads(line) for line in log.read_text().splitlines()] == resumed

    log.write_text("".join(json.dumps(r) + "\n" for r in kept[:-1]))  # a log cut short
    with pytest.raises(KMergeConfigError, match=r"follows \d+ records of .*metrics.jsonl"):
        read_history(log, len(kept), step2)


def test_resume_refuses_checkpoints_of_another_run(tiny_model, tiny_dir, tmp_path, capsys):
    cfg = small_run(tmp_path, steps=2, save_every=1)
    train(cfg, model=tiny_model(4))
    with pytest.raises(KMergeConfigError, match="earlier run .*step-00000002.*pass --resume"):
        train(cfg, model=tiny_model(4))  # a fresh run would overwrite them
    with pytest.raises(KMergeConfigError, match=r"config\.lr: 0\.0003 there, 0\.001 here"):
        train(dataclasses.replace(cfg, resume=True, lr=1e-3), model=tiny_model(4))
    with pytest.raises(KMergeConfigError, match=r"model\.k: 4 there, 2 here"):
        train(dataclasses.replace(cfg, resume=True), model=tiny_model(2))
    # Settings that do not change the numbers may change.
    later = dataclasses.replace(cfg, resume=True, save_every=5, keep_checkpoints=1)
    assert train(later, model=tiny_model(4)).steps == 2

    with pytest.raises(SystemExit) as stop:
        main(train_args(tiny_dir, tmp_path / "nothing", 2, "--resume"))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"kmerge: error: --resume: no complete checkpoint in {tmp_path}/nothing/checkpoints "
        "to continue from"
    )


def test_resume_takes_settings_an_older_checkpoint_lacks_as_their_defaults(tiny_model, tmp_path):
    """A checkpoint written before a setting existed ran at that setting's default: resuming it
    with the default is allowed, with another value refused, naming the setting."""
    cfg = small_run(tmp_path, steps=2, save_every=1)
    train(cfg, model=tiny_model(4))
    for checkpoint in complete_checkpoints(checkpoints_dir(tmp_path / "run")):
        state = json.loads((checkpoint / STATE_FILE).read_text())
        del state["run"]["config"]["weight_decay"]  # as if written before it existed
        del state["run"]["model"]["merge_norm"]
        (checkpoint / STATE_FILE).write_text(json.dumps(state))
        (checkpoint / MARKER_FILE).unlink()  # rewritten with the edited file's size
        _write_marker(checkpoint)
    with pytest.raises(KMergeConfigError, match=r"config\.weight_decay: 0\.0 there, 0\.1 here"):
        train(dataclasses.replace(cfg, resume=True, weight_decay=0.1), model=tiny_model(4))
    assert train(dataclasses.replace(cfg, resume=True), model=tiny_model(4)).steps == 2


def test_sigterm_finishes_the_step_checkpoints_and_exits(tiny_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = kmerge_process.start(
        ["train", "--base-model", tiny_dir, "--steps", "1000", "--batch-size", "4",
         "--n-train", "16", "--n-eval", "4", "--log-every", "1", "--save-every", "100000",
         "--output-dir", out],
        log,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    kmerge_process.wait_for(
        lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 2,
        proc,
        log,
        "two logged steps",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    (checkpoint,) = complete_checkpoints(out / "checkpoints")
    step = read_state(checkpoint)["progress"]["step"]
    assert 2 <= step < 1000
    assert records(out, "loss")[-1]["step"] == step  # the step was finished and logged
    last_line = log.read_text().strip().splitlines()[-1]
    assert last_line == (
        f"kmerge: stopped by SIGTERM after step {step}; checkpoint {checkpoint} "
        "(continue with --resume)"
    )
    assert "Traceback" not in log.read_text()
    assert not (out / "checkpoint").exists()


def interrupt_or_poison(model: KMergeModel, call: int, action) -> None:
    """Make the ``call``-th forward pass of ``model`` (a training micro-batch: evaluation does
    not use forward) run ``action(output)``."""
    forward, calls = model.forward, [0]

    def patched(prompts, answers):
        calls[0] += 1
        out = forward(prompts, answers)
        if calls[0] == call:
            action(out)
        return out

    model.forward = patched


@pytest.fixture
def python_sigint():
    """SIGINT raises KeyboardInterrupt, as Python sets it up in a foreground process; a process
    started in the background by a non-interactive shell (nohup, ``&``) inherits it ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_mid_step_checkpoints_after_the_step(tiny_model, tmp_path, python_sigint):
    model = tiny_model(4)
    interrupt_or_poison(model, 3, lambda out: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted) as stop:
        train(small_run(tmp_path, steps=50, eval_every=100, save_every=1000), model=model)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert (stop.value.signum, stop.value.step, stop.value.checkpoint) == (
        signal.SIGINT, 3, checkpoint
    )  # fmt: skip
    assert read_state(checkpoint)["progress"]["step"] == 3
    # The checkpoint holds the weights after the whole third step.
    saved = trainable_weights(checkpoint / MODEL_DIR)
    model.save_pretrained(tmp_path / "now")
    assert all(torch.equal(saved[k], v) for k, v in trainable_weights(tmp_path / "now").items())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_without_checkpoints_sigint_interrupts_at_once(tiny_model, tmp_path, python_sigint):
    model = tiny_model(4)
    interrupt_or_poison(model, 2, lambda out: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        train(small_run(tmp_path, steps=50, save_every=0), model=model)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(KMergeConfigError, match="resume needs the output_dir"):
        small_run(tmp_path, resume=True, output_dir=None)
    assert small_run(tmp_path, save_every=1, output_dir=None).checkpoint_every == 0  # no folder


def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoints(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    forward, calls = KMergeModel.forward, [0]

    def nan_at_step_5(self, prompts, answers):
        calls[0] += 1
        out = forward(self, prompts, answers)
        if calls[0] == 5:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(KMergeModel, "forward", nan_at_step_5)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main([*train_args(tiny_dir, out, 8), "--save-every", "2", "--keep-checkpoints", "5"])
    assert stop.value.code == 1
    root = out / "checkpoints"
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (
        "kmerge: error: loss became nan at step 5 (stage small); stopped before that update, "
        f"the last good checkpoint is {root / 'step-00000004'}"
    )
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000002", "step-00000004"]
    weights = trainable_weights(root / "step-00000004" / MODEL_DIR)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "checkpoint").exists()
