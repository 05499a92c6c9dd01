"""Bad input through the command line: each case ends with exit status 2 and exactly one line
``kmerge: error: ...`` naming the problem, never a traceback; and a ``kmerge train`` that is
refused or fails on its input leaves the output directory as it was.

One tiny run is trained per module (``finished``); each case damages a copy of it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kmerge.cli import main
from tests.conftest import build_tiny_base

TRAIN = ["--steps", "2", "--batch-size", "4", "--n-train", "16", "--n-eval", "4"]
TRAIN += ["--eval-every", "2"]


@dataclass
class Setup:
    base: Path  # a tiny random Llama as a local model directory
    run: Path  # a finished `kmerge train` output directory
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoint"

    def train_argv(self, out: Path, *extra: str) -> list[str]:
        return ["train", "--base-model", str(self.base), *TRAIN, "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer) -> Setup:
    root = tmp_path_factory.mktemp("cli-errors")
    base = root / "tiny-base"
    build_tiny_base(len(tokenizer), seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    setup = Setup(base, root / "run", root)
    main(setup.train_argv(setup.run))
    assert (setup.checkpoint / "kmerge_config.json").is_file()
    return setup


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def visible_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows for ``text``: what follows the last carriage
    return of each line (a progress bar that erased itself with ``\\r`` leaves nothing)."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def run_error(argv: list[str], capsys) -> str:
    """Run ``kmerge argv`` expecting a bad-input exit; returns its one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = visible_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("kmerge: error: ")
    return lines[0]


# ------------------------------------------------------------------ damaged inputs
def damaged_checkpoint(s: Setup, tmp: Path, name: str, damage) -> Path:
    """A copy of the finished run's checkpoint with file ``name`` damaged by ``damage``."""
    copy = tmp / "ckpt"
    shutil.copytree(s.checkpoint, copy)
    damage(copy / name)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def pickle_instead(path: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


def not_json(path: Path) -> None:
    path.write_text('{"k": 4, "base_model": ')


def eval_checkpoint(name: str, damage):
    def argv(s: Setup, tmp: Path) -> list[str]:
        return ["eval", "--checkpoint", str(damaged_checkpoint(s, tmp, name, damage))]

    return argv


def rows_file(tmp: Path, rows: list[str]) -> Path:
    path = tmp / "rows.jsonl"
    path.write_text("".join(row + "\n" for row in rows))
    return path


def too_long_prompt(s: Setup, tmp: Path) -> list[str]:
    rows = [
        json.dumps({"prompt": "Is the sky blue?", "answer": "yes"}),
        json.dumps({"prompt": "word " * 1500, "answer": "no"}),  # 256 positions, K=4
    ]
    return ["eval", "--checkpoint", str(s.checkpoint), "--eval-file", str(rows_file(tmp, rows))]


def bad_row(s: Setup, tmp: Path) -> list[str]:
    rows = [json.dumps({"prompt": "a", "answer": "b"}), json.dumps({"prompt": "no answer"})]
    return s.train_argv(tmp / "out", "--train-file", str(rows_file(tmp, rows)))


def output_dir_is_a_file(s: Setup, tmp: Path) -> list[str]:
    (tmp / "taken").write_text("a file\n")
    return s.train_argv(tmp / "taken")


def unrelated_folder(s: Setup, tmp: Path) -> list[str]:
    out = tmp / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}\n')
    (out / "notes.txt").write_text("keep me\n")
    return s.train_argv(out)


CASES = [
    # (case, argv(setup, tmp_path), what the line must say)
    ("truncated encoder", eval_checkpoint("encoder.safetensors", truncate),
     ["encoder.safetensors", "not a readable safetensors file"]),
    ("truncated adapter", eval_checkpoint("adapter_model.safetensors", truncate),
     ["adapter_model.safetensors", "not a readable safetensors file"]),
    ("pickle as encoder", eval_checkpoint("encoder.safetensors", pickle_instead),
     ["encoder.safetensors", "not a readable safetensors file"]),
    ("pickle as adapter", eval_checkpoint("adapter_model.safetensors", pickle_instead),
     ["adapter_model.safetensors", "not a readable safetensors file"]),
    ("config not JSON", eval_checkpoint("kmerge_config.json", not_json),
     ["kmerge_config.json", "not valid JSON"]),
    ("config a JSON list", eval_checkpoint("kmerge_config.json", lambda p: p.write_text("[4]")),
     ["kmerge_config.json", "JSON object"]),
    ("generate 0 tokens",
     lambda s, t: ["generate", "--checkpoint", str(s.checkpoint), "--max-new-tokens", "0",
                   "--prompt", "x"],
     ["max_new_tokens must be >= 1, got 0"]),
    ("generate -1 tokens",
     lambda s, t: ["generate", "--checkpoint", str(s.checkpoint), "--max-new-tokens", "-1",
                   "--prompt", "x"],
     ["max_new_tokens must be >= 1, got -1"]),
    ("temperature without sampling",
     lambda s, t: ["generate", "--checkpoint", str(s.checkpoint), "--temperature", "0.7",
                   "--prompt", "x"],
     ["--temperature applies only with --do-sample"]),
    ("top-p over 1",
     lambda s, t: ["generate", "--checkpoint", str(s.checkpoint), "--do-sample", "--top-p", "2",
                   "--prompt", "x"],
     ["top_p must be <= 1, got 2.0"]),
    ("eval generate-n -1",
     lambda s, t: ["eval", "--checkpoint", str(s.checkpoint), "--generate-n", "-1"],
     ["generate_n must be >= 0, got -1"]),
    ("eval batch size 0",
     lambda s, t: ["eval", "--checkpoint", str(s.checkpoint), "--batch-size", "0"],
     ["batch_size must be >= 1, got 0"]),
    ("output dir is a file", output_dir_is_a_file, ["taken", "is not a directory"]),
    ("unknown model name",
     lambda s, t: ["generate", "--base-model", "no-such-model", "--prompt", "x"],
     ["'no-such-model'", "neither an embedded model", "owner/name"]),
    ("hub id offline",
     lambda s, t: ["generate", "--base-model", "no-such-owner/no-such-model", "--prompt", "x"],
     ["'no-such-owner/no-such-model'", "HF_HUB_OFFLINE"]),
    ("negative lr", lambda s, t: s.train_argv(t / "out", "--lr", "-1"),
     ["lr must be a positive number, got -1.0"]),
    ("bad data row", bad_row, ["rows.jsonl line 2", '"answer"']),
    ("prompt too long", too_long_prompt, ["rows.jsonl line 2", "the model's context is 256"]),
    ("into a finished run", lambda s, t: s.train_argv(s.run),
     ["already holds a finished run (checkpoint, results.json)", "--overwrite"]),
    ("into an unrelated folder", unrelated_folder,
     ["mine", "already holds other files (notes.txt, results.json)", "--overwrite"]),
    ("resume and overwrite", lambda s, t: s.train_argv(t / "out", "--resume", "--overwrite"),
     ["resume or overwrite, not both"]),
    ("model flags with a checkpoint",
     lambda s, t: ["generate", "--checkpoint", str(s.checkpoint), "--lora-r", "4",
                   "--block-alignment", "end", "--prompt", "x"],
     ["--lora-r, --block-alignment cannot apply with --checkpoint", "only --k"]),
    ("protect query with a checkpoint",
     lambda s, t: ["eval", "--checkpoint", str(s.checkpoint), "--protect-query"],
     ["--protect-query cannot apply with --checkpoint"]),
    ("flag that needs another", lambda s, t: s.train_argv(t / "out", "--gate", "0.9"),
     ["--gate applies only with --curriculum"]),
    ("distillation weight without a teacher",
     lambda s, t: s.train_argv(t / "out", "--distill-kl-weight", "1"),
     ["--distill-kl-weight applies only with --teacher"]),
    ("segment chars without segments",
     lambda s, t: s.train_argv(t / "out", "--segment-chars", ";"),
     ["--segment-chars applies only with --block-alignment segments"]),
    ("bad comma list", lambda s, t: s.train_argv(t / "out", "--k-choices", "1,x"),
     ["--k-choices takes comma-separated numbers, got '1,x'"]),
    ("K above the checkpoint's",
     lambda s, t: ["generate", "--checkpoint", str(s.checkpoint), "--k", "8", "--prompt", "x"],
     ["8", "4"]),
]  # fmt: skip


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(finished, tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(finished.run)
    line = run_error(argv(finished, tmp_path), capsys)
    for text in expected:
        assert text in line, line
    assert snapshot(finished.run) == before  # the finished run is never touched


# ------------------------------------------------------------------ output directories
def copy_of_run(s: Setup, tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(s.run, out)
    return out


def test_second_train_into_finished_run_is_refused_and_changes_nothing(finished, capsys):
    before = snapshot(finished.run)
    assert {"results.json", "metrics.jsonl", "train_config.json"} <= set(before)
    line = run_error(finished.train_argv(finished.run, "--seed", "1"), capsys)
    assert str(finished.run) in line
    assert snapshot(finished.run) == before


def test_unrelated_folder_is_refused_and_changes_nothing(finished, tmp_path, capsys):
    argv = unrelated_folder(finished, tmp_path)
    before = snapshot(tmp_path / "mine")
    run_error(argv, capsys)
    assert snapshot(tmp_path / "mine") == before


def test_failing_on_bad_data_writes_nothing(finished, tmp_path, capsys):
    """Even with --overwrite, a run whose data is bad fails before it writes anything."""
    out = copy_of_run(finished, tmp_path)
    before = snapshot(out)
    rows = rows_file(tmp_path, ['{"prompt": "a", "answer": "b"}', '{"prompt": "no answer"}'])
    line = run_error(finished.train_argv(out, "--overwrite", "--train-file", str(rows)), capsys)
    assert "rows.jsonl line 2" in line
    assert snapshot(out) == before  # metrics.jsonl and train_config.json included


def test_bad_checkpoint_for_warm_start_writes_nothing(finished, tmp_path, capsys):
    out = copy_of_run(finished, tmp_path)
    before = snapshot(out)
    bad = damaged_checkpoint(finished, tmp_path, "adapter_model.safetensors", truncate)
    line = run_error(finished.train_argv(out, "--overwrite", "--init-from", str(bad)), capsys)
    assert "init_from" in line
    assert snapshot(out) == before


def test_overwrite_replaces_a_finished_run(finished, tmp_path, capsys):
    out = copy_of_run(finished, tmp_path)
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)  # a stale earlier checkpoint
    old_results = (out / "results.json").read_bytes()
    main(finished.train_argv(out, "--overwrite", "--seed", "3"))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert (out / "results.json").read_bytes() != old_results
    assert json.loads((out / "train_config.json").read_text())["seed"] == 3
    assert not (out / "checkpoints").exists()
    assert (out / "checkpoint" / "kmerge_config.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_unfinished_run_of_the_same_settings_starts_again(finished, tmp_path, capsys):
    """A run that stopped before its first checkpoint left only its settings and log: the same
    command runs it again without --overwrite; other settings are refused."""
    out = copy_of_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoint")
    (out / "results.json").unlink()
    run_error(finished.train_argv(out, "--seed", "5"), capsys)  # another run's settings
    main(finished.train_argv(out))
    assert (out / "results.json").is_file() and (out / "checkpoint").is_dir()
