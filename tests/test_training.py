"""The training loop on a tiny model: it learns, logs JSON Lines, checkpoints atomically, walks
a curriculum, and uses separate learning rates for LoRA and encoder."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.training import TrainConfig, load_data, make_optimizer, train, training_attention
from tests.kmerge_process import assert_same_weights


def small_run(tmp_path, **overrides) -> TrainConfig:
    cfg = dict(
        model=KMergeConfig(k=4),
        stage="small",
        n_train=64,
        n_eval=8,
        steps=4,
        batch_size=4,
        eval_every=2,
        log_every=1,
        warmup_steps=1,
        progress=False,
        output_dir=str(tmp_path / "run"),
    )
    cfg.update(overrides)
    return TrainConfig(**cfg)


def test_train_learns_logs_and_checkpoints(tiny_model, tiny_base, tmp_path):
    # A wider init than the default 0.02 lets the frozen random LM head express confident
    # predictions, so that the loss can fall far within a few steps.
    model = tiny_model(4, base_overrides={"initializer_range": 0.3})
    result = train(small_run(tmp_path, steps=30, lr=1e-2), model=model)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.history
    evals = [r for r in result.history if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == list(range(2, 31, 2))
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["steps"] == 30 and saved["model"]["k"] == 4
    fresh_base = tiny_base(seed=0, initializer_range=0.3)  # the same weights, no adapter yet
    reloaded = KMergeModel.from_pretrained(
        tmp_path / "run" / "checkpoint", base=fresh_base, tokenizer=model.tokenizer
    )
    prompts, answers = ["Tree: AA\n+BB, Answer:"], ["true"]
    assert reloaded(prompts, answers).loss.item() == pytest.approx(
        model(prompts, answers).loss.item()
    )
    assert not list(tmp_path.glob("run/.checkpoint-*"))  # no temporary directory left behind


def test_training_a_merged_lora_is_refused(tiny_model, tmp_path):
    model = tiny_model(4).merge_lora()
    with pytest.raises(KMergeConfigError, match="call model.unmerge_lora"):
        train(small_run(tmp_path), model=model)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_curriculum_advances_at_the_gate(tiny_model, tmp_path):
    """A gate of 0 is always met: each stage stops at its first evaluation."""
    cfg = small_run(tmp_path, curriculum=["small", "xsmall", "medium"], gate=0.0, final_gate=0.0)
    result = train(cfg, model=tiny_model(4))
    evals = [(r["stage"], r["step"]) for r in result.history if "eval_accuracy" in r]
    assert evals == [("small", 2), ("xsmall", 4), ("medium", 6)]
    assert result.steps == 6


def test_curriculum_budget_runs_out(tiny_model, tmp_path):
    """An unreachable gate: each stage uses its whole step budget."""
    cfg = small_run(tmp_path, curriculum=["small", "xsmall"], gate=1.1, final_gate=1.1)
    result = train(cfg, model=tiny_model(4))
    assert result.steps == 8
    assert {r["stage"] for r in result.history} == {"small", "xsmall"}


def test_encoder_has_its_own_learning_rate(tiny_model):
    model = tiny_model(4)
    opt = make_optimizer(model, TrainConfig(lr=1e-4, encoder_lr=1e-2))
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-4, 1e-2]
    encoder_params = {id(p) for p in model.encoder.parameters()}
    enc_group = next(g for g in opt.param_groups if g["lr"] == 1e-2)
    assert {id(p) for p in enc_group["params"]} == encoder_params


def test_jsonl_training_file(tiny_model, tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"Number {i} is", "answer": "even" if i % 2 == 0 else "odd"})
            + "\n"
            for i in range(12)
        )
    )
    options = {"train_file": str(rows), "eval_file": str(rows), "answer_choices": ["even", "odd"]}
    cfg = small_run(tmp_path, task="jsonl", task_options=options, n_eval=4)
    result = train(cfg, model=tiny_model(2))
    assert result.final_eval["n"] == 4
    # With answer choices the held-out metrics include the scored ones, logged at each eval.
    assert result.final_eval["primary_metric"] == "accuracy"
    evals = [r for r in result.history if "eval_choice_accuracy" in r]
    assert evals and all(0 <= r["eval_macro_f1"] <= 1 for r in evals)


@pytest.mark.parametrize(
    "bad", [dict(steps=0), dict(batch_size=0), dict(curriculum=["tiny"]), dict(stage="huge")]
)
def test_bad_train_config(bad):
    from kmerge.errors import KMergeConfigError

    with pytest.raises(KMergeConfigError):
        TrainConfig(**bad)


def test_gradient_accumulation_matches_a_bigger_batch(tiny_model, tmp_path):
    """Two micro-batches of 2 accumulate to the same update as one batch of 4 (every example
    here has the same number of answer tokens, so the token means agree)."""
    weights = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = tiny_model(4, seed=0)
        cfg = small_run(
            tmp_path,
            steps=1,
            batch_size=batch_size,
            grad_accum=accum,
            eval_every=100,
            lr=1e-2,
            warmup_steps=0,
            output_dir=None,
        )
        train(cfg, model=model)
        weights.append([p.detach().clone() for p in model.trainable_parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_train_file_without_held_out_data_skips_evaluation(tiny_model, tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"Say {i}:", "answer": str(i)}) + "\n" for i in range(6))
    )
    result = train(
        small_run(tmp_path, task="jsonl", task_options={"train_file": str(rows)}, steps=3,
                  log_every=2),
        model=tiny_model(2),
    )  # fmt: skip
    assert result.final_eval is None
    assert [r["step"] for r in result.history if "loss" in r] == [2]  # 3 is not a logging step
    assert result.history[0]["data"] == {
        "task": "jsonl", "n_train": 6, "n_eval": 0, "prompts_cut": 0, "bad_rows_skipped": 0,
        "rows_filtered": 0,
    }  # fmt: skip
    assert not any("eval_accuracy" in r for r in result.history)


def test_train_config_round_trips_through_a_runs_file(tmp_path):
    cfg = TrainConfig(model=KMergeConfig(k=2, block_alignment="segments"), curriculum=["xsmall"],
                      k_choices=[1, 2], seed=4, encoder_lr=1e-3)  # fmt: skip
    (tmp_path / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_run(tmp_path) == cfg
    with pytest.raises(KMergeConfigError, match="unknown train config keys: colour"):
        TrainConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(KMergeConfigError, match="not a training run"):
        TrainConfig.from_run(tmp_path / "nothing")
    (tmp_path / "train_config.json").write_text("{")
    with pytest.raises(KMergeConfigError, match="not valid JSON"):
        TrainConfig.from_run(tmp_path)


def trained_prompts(model) -> list[list[str]]:
    """Spy on ``model.prepare``: the prompts of every training batch, in order."""
    seen: list[list[str]] = []
    prepare = model.prepare

    def spy(prompts, *args, **kwargs):
        if model.training:
            seen.append(list(prompts))
        return prepare(prompts, *args, **kwargs)

    model.prepare = spy
    return seen


def runs_of(values: list) -> int:
    """How many runs of equal neighbours ``values`` has."""
    return sum(1 for i, v in enumerate(values) if i == 0 or values[i - 1] != v)


def test_group_by_keeps_a_trees_questions_in_one_batch_and_resumes_exactly(tiny_model,
                                                                           tmp_path):  # fmt: skip
    """With group_by="tree" every tree's questions are fed side by side (split only where they
    cross a batch's end), in a new order each epoch; without it they are scattered; a run
    resumed mid-epoch gets the same batches."""
    cfg = small_run(tmp_path, n_train=24, batch_size=8, steps=6, save_every=1, keep_checkpoints=9,
                    group_by="tree")  # fmt: skip
    model = tiny_model(4)
    batches = trained_prompts(model)
    train(cfg, model=model)
    tree_of = {e.prompt: e.meta["tree"] for e in load_data(cfg, model.tokenizer).train}
    epochs = [sum(batches[i : i + 3], []) for i in (0, 3)]  # 24 examples: 3 batches an epoch
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(tree_of) and epochs[0] != epochs[1]
    for order in epochs:  # a tree's questions are one contiguous run of the epoch's order
        assert runs_of([tree_of[p] for p in order]) == len(set(tree_of.values()))
    per_tree = len(tree_of) / len(set(tree_of.values()))
    assert per_tree > 1.5  # the test means something: trees have several questions

    plain_batches = trained_prompts(plain := tiny_model(4))
    train(dataclasses.replace(cfg, group_by=None, output_dir=str(tmp_path / "plain")), model=plain)
    assert runs_of([tree_of[p] for p in sum(plain_batches[:3], [])]) > len(set(tree_of.values()))

    shutil.copytree(tmp_path / "run" / "checkpoint", tmp_path / "whole")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000005")  # resume inside epoch 2
    again = trained_prompts(resumed_model := tiny_model(4))
    train(dataclasses.replace(cfg, resume=True), model=resumed_model)
    assert again == batches[4:]
    assert_same_weights(tmp_path / "whole", tmp_path / "run" / "checkpoint")


def test_group_by_a_field_the_examples_lack_is_named(tiny_model, tmp_path):
    message = r"group_by='review': training example 0 has no meta field 'review' \(its fields: "
    with pytest.raises(KMergeDataError, match=message + r"child, parent, stage, tree\)"):
        train(small_run(tmp_path, group_by="review"), model=tiny_model(4))


def test_bf16_on_the_cpu_trains_with_eager_attention_and_gives_the_kernel_back(tiny_model):
    model = tiny_model(4)
    model.lm.set_attn_implementation("sdpa")
    during = {}
    for precision in ("no", "bf16"):
        cpu = torch.device("cpu")
        with pytest.raises(KeyboardInterrupt), training_attention(model, precision, cpu):
            during[precision] = model.lm.config._attn_implementation
            raise KeyboardInterrupt  # an interrupted run gives it back too
        assert model.lm.config._attn_implementation == "sdpa"
    assert during == {"no": "sdpa", "bf16": "eager"}
