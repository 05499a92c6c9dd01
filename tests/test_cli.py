"""The command line end to end on a tiny local model: train, eval (task and JSON Lines),
generate, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from kmerge.cli import main
from kmerge.modeling import KMergeModel


def test_train_eval_generate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(
        [
            "train",
            "--base-model",
            str(tiny_dir),
            "--k",
            "4",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--n-train",
            "32",
            "--n-eval",
            "8",
            "--eval-every",
            "3",
            "--output-dir",
            str(out),
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3
    ckpt = out / "checkpoint"
    assert (ckpt / "kmerge_config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)

    main(["eval", "--checkpoint", str(ckpt), "--n-eval", "8", "--output", str(tmp_path / "e.json")])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["k"] == 4
    # Measured compression: K=4 feeds about a quarter of the prompt tokens.
    assert 3.0 < result["compression"] <= 4.0
    assert result["mean_positions_fed"] * 3.0 < result["mean_prompt_tokens"]
    assert len(json.loads((tmp_path / "e.json").read_text())["predictions"]) == 8

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "Is the sky blue? Answer:", "answer": "yes"}\n'
        '{"prompt": "Is fire cold? Answer:", "answer": "no"}\n'
    )
    main(["eval", "--checkpoint", str(ckpt), "--eval-file", str(rows)])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["task"] == "jsonl"
    # --split train scores the training rows instead (a memorisation check).
    train_rows = tmp_path / "train.jsonl"
    train_rows.write_text("".join(f'{{"prompt": "Q{i}:", "answer": "yes"}}\n' for i in range(3)))
    files = ["--train-file", str(train_rows), "--eval-file", str(rows)]
    main(["eval", "--checkpoint", str(ckpt), *files, "--split", "train"])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and result["split"] == "train"

    prompts = ["Tree: AA, Answer:", "Tree: BB\n+CC, Answer:"]
    main(["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "3"]
         + ["--prompt", prompts[0], "--prompt", prompts[1]])  # fmt: skip
    # One line per prompt: the checkpoint's greedy answer, LoRA merged as the command runs it.
    expected = KMergeModel.from_pretrained(ckpt).merge_lora().generate(prompts, max_new_tokens=3)
    assert capsys.readouterr().out == "".join(text + "\n" for text in expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "0"], "K must be an integer >= 1, got 0"),
        (["--stage", "huge"], "huge"),
        (["--curriculum", "small,nope"], "nope"),
    ],
)
def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--base-model",
                str(tiny_dir),
                "--steps",
                "1",
                "--n-train",
                "8",
                "--output-dir",
                str(tmp_path / "r"),
                *argv,
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may precede it
    assert err.startswith("kmerge: error:") and message in err


def test_eval_rows_without_answer(tiny_dir, tmp_path, capsys):
    rows = tmp_path / "bad.jsonl"
    rows.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "no answer here"}\n')
    with pytest.raises(SystemExit):
        main(["eval", "--base-model", str(tiny_dir), "--eval-file", str(rows)])
    err = capsys.readouterr().err
    assert "line 2" in err and "answer" in err


def test_missing_checkpoint_files(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path / "ckpt")])
    assert "missing" in capsys.readouterr().err
