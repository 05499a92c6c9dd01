"""The options of the quality work (docs/quality.md): protected spans, merging at another K,
norm-matched merges, fresh tree streams, time budgets, several K in one model, warm starts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kmerge.batching import prompt_layout
from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.evaluation import evaluate
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.reconstruction import (
    RECONSTRUCT_INSTRUCTION,
    continuation_example,
    is_reconstruction_step,
    reconstruction_example,
)
from kmerge.tasks import get_task
from kmerge.tasks.base import Example, example_protect_spans
from kmerge.tasks.tree import TreeTask, make_tree_examples
from kmerge.training import TrainConfig, load_data, train
from tests.conftest import randomise_trainables
from tests.helpers import assert_greedy_equivalent
from tests.test_modeling import PROMPTS, answers_for, check_batch_equals_single, ragged_prompts
from tests.test_training import small_run as training_run

TREE_PROMPTS = [e.prompt for e in make_tree_examples("small", 6, 0, "test")]


# ------------------------------------------------------------------ protected spans
@pytest.mark.parametrize(
    "n, k, align, protected, expected",
    [
        (6, 4, "start", "000000", [(0, 4, False), (4, 6, False)]),
        (6, 4, "start", "001000", [(0, 2, False), (2, 3, True), (3, 6, False)]),
        (
            6,
            2,
            "end",
            "100011",
            [(0, 1, True), (1, 2, False), (2, 4, False), (4, 5, True), (5, 6, True)],
        ),  # fmt: skip
        (3, 4, "start", "111", [(0, 1, True), (1, 2, True), (2, 3, True)]),
    ],
)
def test_prompt_layout_by_hand(n, k, align, protected, expected):
    assert prompt_layout(n, k, align, (), [c == "1" for c in protected]) == expected


def test_prompt_layout_segments_inside_runs():
    starts = [False, False, True, False, False, False]
    protected = [False, False, False, True, False, False]
    # The run [0, 3) is cut at the segment start 2; the run [4, 6) is one block.
    assert prompt_layout(6, 4, "segments", starts, protected) == [
        (0, 2, False), (2, 3, False), (3, 4, True), (4, 6, False),
    ]  # fmt: skip


def test_prompt_layout_refuses_wrong_flag_count():
    with pytest.raises(KMergeDataError, match="3 flags for a prompt of 4 tokens"):
        prompt_layout(4, 2, "start", (), [True, False, False])


def test_protect_query_keeps_the_question_tokens_exactly(tiny_model, tokenizer):
    model = tiny_model(4, protect_pattern=TreeTask.query_pattern)
    randomise_trainables(model, seed=3)  # the encoder's MLP is active: merges are not means
    prompt = TREE_PROMPTS[0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    query = prompt[prompt.index("Parent: ") :]
    n_query = len(tokenizer(" " + query, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        batch = model.prepare([prompt])
        raw = model.lm.get_input_embeddings()(torch.tensor(ids[-n_query:]))
    assert batch.raw_positions == [n_query]
    n_merged = -(-(len(ids) - n_query) // 4)
    assert batch.positions_fed == [n_merged + n_query]
    torch.testing.assert_close(batch.inputs_embeds[0, -n_query:], raw, rtol=0, atol=0)


@pytest.mark.parametrize("align", ["start", "end", "segments"])
def test_protected_batch_equals_single(tiny_model, tokenizer, align):
    model = tiny_model(4, block_alignment=align, protect_pattern=r"[,:]", protect_last=2)
    randomise_trainables(model, seed=7)
    prompts = ragged_prompts(tokenizer, 4) + TREE_PROMPTS[:2]
    check_batch_equals_single(model, prompts, answers_for(prompts))


def test_attention_pooling_batch_equals_single(tiny_model, tokenizer):
    model = tiny_model(4, merge_pooling="attention", block_alignment="segments")
    randomise_trainables(model, seed=8)  # the pooling scores are not zero: weights differ
    prompts = ragged_prompts(tokenizer, 4) + TREE_PROMPTS[:2]
    check_batch_equals_single(model, prompts, answers_for(prompts))


def test_block_jitter_recuts_prompts_in_training_only(tiny_model, tokenizer):
    """In training each prompt gets extra random block starts on top of its segments (new cuts
    at each call, the same for the same torch seed); in evaluation the layout is the plain
    segments one, so evaluation and batched == one-by-one are untouched."""
    prompts = ragged_prompts(tokenizer, 3) + TREE_PROMPTS[:2]
    plain = tiny_model(4, block_alignment="segments")
    model = tiny_model(4, block_alignment="segments", block_jitter=0.3)
    assert model.prompt_layouts(prompts) == plain.prompt_layouts(prompts)
    assert model.prepare(prompts).block_ends == plain.prepare(prompts).block_ends
    check_batch_equals_single(model, prompts, answers_for(prompts))

    model.train()
    flags = plain._tokens(prompts, None)[2]  # the segment starts (newlines, commas)
    segment_starts = [{t for t, flag in enumerate(row) if flag} for row in flags]
    torch.manual_seed(0)
    first = model.prompt_layouts(prompts)
    second = model.prompt_layouts(prompts)
    torch.manual_seed(0)
    assert model.prompt_layouts(prompts) == first  # the run's seed decides the cuts
    assert first != second  # a prompt seen again is cut anew
    assert any(segment_starts)
    for layout, starts in zip(first, segment_starts):
        assert starts <= {a for a, _, _ in layout}  # no block straddles a segment, as before
        assert all(b - a <= 4 for a, b, _ in layout)
    assert sum(map(len, first)) > sum(map(len, plain.prompt_layouts(prompts)))  # finer cuts
    torch.manual_seed(0)
    batch = model.prepare(prompts, answers_for(prompts))
    assert batch.block_ends == [[b - 1 for _, b, _ in spans] for spans in first]


def test_attention_pooling_under_bf16_autocast_masks_padding(tiny_model, tokenizer):
    """bf16 mixed precision (--mixed-precision bf16) computes the pooling scores in bf16: the
    padding slots' score must be bf16's lowest, not fp32's (which overflows)."""
    model = tiny_model(4, merge_pooling="attention", block_alignment="segments")
    randomise_trainables(model, seed=8)
    prompts = ragged_prompts(tokenizer, 4)
    plain = model.prepare(prompts, answers_for(prompts))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.prepare(prompts, answers_for(prompts))
        assert torch.isfinite(model.loss(mixed).loss)
    mask = plain.attention_mask.bool()
    assert torch.equal(mixed.attention_mask, plain.attention_mask)
    torch.testing.assert_close(
        mixed.inputs_embeds.float()[mask], plain.inputs_embeds[mask], atol=0.05, rtol=0.05
    )


def test_per_call_protect_spans(tiny_model, tokenizer):
    model = tiny_model(4)
    prompt = "one two three four five six seven eight"
    start = prompt.index("five")
    plain = model.prepare([prompt])
    spans = model.prepare([prompt], protect=[[(start, start + 4)]])
    assert spans.raw_positions == [1] and plain.raw_positions == [0]
    assert spans.positions_fed[0] == plain.positions_fed[0] + 1


def test_token_dropout_leaves_out_unprotected_tokens_in_training_only(tiny_model, tokenizer):
    """In training each unprotected prompt token is left out with probability p (other tokens
    at each call, the same for the same torch seed; protected tokens and the tokens' order
    kept, never an empty prompt); in evaluation the prompt is whole, and batched == one-by-one
    holds."""
    prompts = ragged_prompts(tokenizer, 3) + TREE_PROMPTS[:2]
    plain = tiny_model(4, protect_last=2)
    model = tiny_model(4, protect_last=2, token_dropout=0.5)
    full = plain._tokens(prompts, None)[0]
    assert model._tokens(prompts, None)[0] == full
    assert model.prepare(prompts).block_ends == plain.prepare(prompts).block_ends
    check_batch_equals_single(model, prompts, answers_for(prompts))

    model.train()
    torch.manual_seed(0)
    first, flags, _, counts = model._tokens(prompts, None)
    second = model._tokens(prompts, None)[0]
    torch.manual_seed(0)
    assert model._tokens(prompts, None)[0] == first  # the run's seed decides what is left out
    assert first != second  # a prompt seen again loses other tokens
    assert counts == [len(ids) for ids in full]  # compression counts the whole prompt
    assert sum(map(len, first)) < 0.8 * sum(map(len, full))
    for kept, whole, raw in zip(first, full, flags):
        last = min(2, len(whole))
        assert kept[-last:] == whole[-last:] and raw[-last:] == [True] * last  # always kept
        assert not any(raw[:-last])
        it = iter(whole)
        assert all(t in it for t in kept)  # a subsequence: order kept
    torch.manual_seed(0)
    layouts = model.prompt_layouts(prompts)
    assert [spans[-1][1] for spans in layouts] == [len(ids) for ids in first]
    torch.manual_seed(0)
    batch = model.prepare(prompts, answers_for(prompts))
    assert batch.block_ends == [[b - 1 for _, b, _ in spans] for spans in layouts]
    assert batch.prompt_tokens == [len(ids) for ids in full]

    nearly_all = tiny_model(4, token_dropout=0.99)
    nearly_all.train()
    kept = nearly_all._tokens(prompts, None)[0]
    assert all(len(ids) >= 1 for ids in kept)
    assert sum(map(len, kept)) < sum(map(len, full)) / 4


def test_token_dropout_refuses_a_teacher(tiny_model):
    from kmerge.distillation import Distiller

    with pytest.raises(KMergeConfigError, match="token_dropout cannot be combined with a teacher"):
        Distiller(tiny_model(4, token_dropout=0.1), "base", prompt_weight=1.0)


@pytest.mark.parametrize("k", [4, 2])
def test_prompt_layouts_are_the_blocks_prepare_merges(tiny_model, tokenizer, k):
    """What diagnostics read as a model's layout is the layout the model feeds: every span ends
    where a fed position's block ends, and the raw spans are the protected tokens."""
    model = tiny_model(4, block_alignment="segments", protect_pattern=r"[,:]", protect_last=2)
    prompts = ragged_prompts(tokenizer, 3) + TREE_PROMPTS[:2]
    layouts = model.prompt_layouts(prompts, k=k)
    batch = model.prepare(prompts, k=k)
    assert [[b - 1 for _, b, _ in spans] for spans in layouts] == batch.block_ends
    assert [sum(raw for *_, raw in spans) for spans in layouts] == batch.raw_positions
    assert all(b - a <= k for spans in layouts for a, b, _ in spans)
    plain = tiny_model(4).prompt_layouts(prompts, k=k)
    assert plain != layouts and all(not raw for spans in plain for *_, raw in spans)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"protect_pattern": "("}, "not a regular expression"),
        ({"protect_last": -1}, "protect_last must be >= 0"),
        ({"merge_norm": "l2"}, "merge_norm must be"),
        ({"protect_surprising": 1.0}, r"share in \[0, 1\)"),
        ({"block_jitter": 0.1}, "needs block_alignment='segments'"),
        ({"token_dropout": 1.0}, r"probability in \[0, 1\)"),
        ({"token_dropout": -0.1}, r"probability in \[0, 1\)"),
        ({"block_jitter": 1.5, "block_alignment": "segments"}, r"block_jitter must be in"),
        (
            {"protect_last": 2, "prompt_compressor": "random_drop", "compression_ratio": 2.0},
            "cannot be combined",
        ),  # fmt: skip
    ],
)
def test_bad_quality_options(kwargs, message):
    with pytest.raises(KMergeConfigError, match=message):
        KMergeConfig(k=4, **kwargs)


# ------------------------------------------------------------------ merging at another K
def test_k1_on_a_k4_model_feeds_the_plain_tokens(tiny_model, tiny_base, tokenizer):
    model = tiny_model(4)
    randomise_trainables(model, seed=1)
    model.peft_model.disable_adapter_layers()
    base = tiny_base()
    prompt, answer = PROMPTS[0], " yes"
    ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        batch = model.prepare([prompt], [answer.strip()], k=1)
        n = batch.positions_fed[0]
        embeds = base.get_input_embeddings()(torch.tensor(ids[:n]))
    assert n == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(batch.inputs_embeds[0, :n], embeds, rtol=0, atol=0)


def test_smaller_k_merges_partial_blocks(tiny_model):
    """At average init a K=4 encoder merging at K=2 gives exactly what a K=2 model gives."""
    k4, k2 = tiny_model(4), tiny_model(2)
    with torch.no_grad():
        a = k4.prepare(PROMPTS, k=2)
        b = k2.prepare(PROMPTS)
    assert a.positions_fed == b.positions_fed
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds, rtol=1e-6, atol=1e-6)


def test_k_above_the_encoder_is_refused(tiny_model):
    with pytest.raises(KMergeConfigError, match="K=8 is larger than the K=4"):
        tiny_model(4).prepare(PROMPTS, k=8)


# ------------------------------------------------------------------ norm-matched merges
def test_token_norm_merge_keeps_direction_and_token_norm(tiny_model, tokenizer):
    model = tiny_model(4, merge_norm="token")
    prompt = "alpha beta gamma delta"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:4]
    prompt = tokenizer.decode(ids)
    with torch.no_grad():
        tokens = model.lm.get_input_embeddings()(torch.tensor(ids))
        merged = model.prepare([prompt]).inputs_embeds[0, 0]
    mean = tokens.mean(dim=0)
    assert merged.norm().item() == pytest.approx(tokens.norm(dim=-1).mean().item(), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(merged, mean, dim=0).item()
    assert cosine == pytest.approx(1.0, abs=1e-5)
    assert merged.norm() > mean.norm() * 1.05  # a mean of different tokens is shorter


def test_centered_merge_scales_the_deviation_from_the_table_mean(
    tiny_model, tiny_base, tokenizer, tmp_path
):
    """c + sqrt(n) (mean - c) with c the embedding table's mean, for a full block of 4 and a
    partial block of 2; a one-token block stays its token; batched == one by one; a saved
    model (c is rebuilt from the base, not stored) merges alike after loading."""
    model = tiny_model(4, merge_norm="centered")
    table = model.lm.get_input_embeddings().weight
    ids = tokenizer("alpha beta gamma delta epsilon zeta", add_special_tokens=False)["input_ids"]
    for n in (4, 2, 1):
        prompt = tokenizer.decode(ids[:n])
        with torch.no_grad():
            tokens = table[torch.tensor(ids[:n])]
            merged = model.prepare([prompt]).inputs_embeds[0, 0]
            center = table.mean(dim=0)
        expected = center + (tokens.mean(dim=0) - center) * math.sqrt(n)
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    randomise_trainables(model, seed=3)
    check_batch_equals_single(model, TREE_PROMPTS[:4], answers_for(TREE_PROMPTS[:4]))
    model.save_pretrained(tmp_path / "centered")
    loaded = KMergeModel.from_pretrained(
        tmp_path / "centered", base=tiny_base(), tokenizer=tokenizer
    )
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.prepare(TREE_PROMPTS[:2]).inputs_embeds,
            model.prepare(TREE_PROMPTS[:2]).inputs_embeds,
        )


# ------------------------------------------------------------------ fresh tree stream
def test_fresh_tree_stream_is_deterministic_and_never_yields_a_test_tree(tokenizer):
    cfg = TrainConfig(model=KMergeConfig(k=4), stage="small", steps=40, batch_size=8, n_eval=64)
    assert cfg.n_train is None
    data = load_data(cfg, tokenizer)
    again = load_data(cfg, tokenizer)
    assert len(data.train) == 40 * 8  # one fresh example for every example the run consumes
    assert data.train == again.train and data.held_out == again.held_out
    other_seed = load_data(TrainConfig(**{**cfg.to_dict(), "seed": 1}), tokenizer)
    assert other_seed.train != data.train
    train_trees = {e.meta["tree"] for e in data.train}
    assert not train_trees & {e.meta["tree"] for e in data.held_out}
    # fresh trees, not a few repeated ones: a `small` tree gives at most 4 questions
    assert len(train_trees) >= len(data.train) // 4


def test_file_tasks_use_every_row_by_default(tokenizer, tmp_path):
    rows = [{"prompt": f"Review {i}: fine, Label:", "answer": "positive"} for i in range(7)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(task="jsonl", task_options={"train_file": str(path)}, steps=100)
    assert len(load_data(cfg, tokenizer).train) == 7


# ------------------------------------------------------------------ training options
def small_run(tmp_path, **overrides) -> TrainConfig:
    """test_training's tiny run, on fresh trees (n_train None), without mid-run evaluations."""
    settings = {"n_train": None, "steps": 6, "eval_every": 100} | overrides
    return training_run(tmp_path, **settings)


def spy_on_forward(model) -> list[tuple[list, list, dict]]:
    """(prompts, answers, options) of every forward call the training loop makes, in order."""
    calls, forward = [], model.forward

    def spy(prompts, answers, **options):
        calls.append((prompts, answers, options))
        return forward(prompts, answers, **options)

    model.forward = spy
    return calls


def ks_of(calls) -> list:
    """The K of each recorded forward call (None: the model's own)."""
    return [options.get("k") for _, _, options in calls]


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_the_run(tiny_model, tmp_path, clock):
    result = train(
        small_run(tmp_path, steps=10_000, time_budget=0.5, budget_clock=clock), tiny_model(4)
    )
    assert 1 <= result.steps < 10_000
    assert 0.5 <= result.train_seconds < 60
    lrs = [r["lr"] for r in result.history if "lr" in r][1:]  # after the warm-up step
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # cosine: never rises
    assert result.final_eval is not None  # the stop still evaluates


def test_time_budget_progress_bar_counts_the_budget_not_the_steps(tiny_model, tmp_path, capsys):
    train(small_run(tmp_path, steps=10_000, time_budget=0.5, progress=True), tiny_model(4))
    bar = capsys.readouterr().err
    assert "/0 s [" in bar or "/1 s [" in bar  # the budget of 0.5 s, shown in whole seconds
    assert "10000" not in bar  # not the step limit the budget stops short of


def test_time_budget_progress_bar_survives_a_last_step_past_the_budget(
    tiny_model, tmp_path, capsys, monkeypatch
):
    """A clock that ticks 2 s per reading: steps "take" 2 s or more and the last one ends
    past the 3 s budget, which made tqdm drop the bar's total and the time bar's format fail
    (`make demo` crashed at its end)."""
    import kmerge.training as training

    ticks = iter(range(0, 100_000, 2))
    monkeypatch.setattr(training, "_clock", lambda kind: next(ticks))
    result = train(small_run(tmp_path, steps=100, time_budget=3.0, progress=True), tiny_model(4))
    assert result.train_seconds >= 3.5 and result.steps < 100  # stopped, past the budget
    assert "3/3 s [" in capsys.readouterr().err


def test_lr_schedule_follows_the_time_budget():
    from kmerge.training import Progress, _lr_factor

    cfg = TrainConfig(model=KMergeConfig(k=4), steps=1000, warmup_steps=10, time_budget=100.0)
    progress = Progress()
    factor = _lr_factor(cfg, 1000, lambda: progress)
    assert factor(5) == pytest.approx(0.5)  # linear warm-up
    assert factor(10) == pytest.approx(1.0)
    progress.train_seconds = 50.0  # half the budget, 1% of the steps: time decides
    assert factor(20) == pytest.approx(0.5, abs=1e-6)
    progress.train_seconds = 100.0
    assert factor(20) == pytest.approx(0.0, abs=1e-9)
    progress.train_seconds = 0.0  # half the steps, no time used: steps decide
    assert factor(505) == pytest.approx(0.5, abs=1e-6)


def test_constant_schedule_keeps_the_lr(tiny_model, tmp_path):
    result = train(small_run(tmp_path, lr_schedule="constant", lr=1e-3), tiny_model(4))
    lrs = [r["lr"] for r in result.history if "lr" in r]
    assert lrs[1:] == [pytest.approx(1e-3)] * (len(lrs) - 1)


def test_several_k_trains_each_k_and_evaluates_at_each(tiny_model, tmp_path):
    model = tiny_model(4)
    calls = spy_on_forward(model)
    train(small_run(tmp_path, steps=12, k_choices=[1, 2, 4]), model)
    assert set(ks_of(calls)) == {1, 2, 4}
    reloaded = KMergeModel.from_pretrained(
        tmp_path / "run" / "checkpoint", base=model.lm, tokenizer=model.tokenizer
    )
    task = get_task("tree", stage="small", n_test=8)
    examples = task.examples("test")
    fed = {k: evaluate(reloaded, examples, task, k=k, progress=False) for k in (1, 2, 4)}
    assert fed[1]["k"] == 1 and fed[1]["compression"] == pytest.approx(1.0)
    assert fed[1]["compression"] < fed[2]["compression"] < fed[4]["compression"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"encoder_lr": 0.0}, "encoder_lr must be a positive number"),
        ({"time_budget": float("nan")}, "time_budget must be a positive number"),
        ({"k_choices": [1, 8]}, r"every K must be an integer in 1..4"),
        ({"budget_clock": "gpu"}, "budget_clock must be"),
        ({"n_train": 0}, "n_train must be >= 1"),
        ({"reconstruct_share": -0.1}, r"reconstruct_share must be in 0.0..1.0"),
        ({"focal_gamma": -1.0}, "focal_gamma must be >= 0"),
    ],
)
def test_bad_training_options(overrides, message):
    with pytest.raises(KMergeConfigError, match=message):
        TrainConfig(model=KMergeConfig(k=4), **overrides)


def lora_tensors(model: KMergeModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_" in n}


def test_warm_start_loads_exactly_the_k1_lora(tiny_model, tmp_path):
    teacher = tiny_model(1)
    randomise_trainables(teacher, seed=5)
    teacher.save_pretrained(tmp_path / "k1")
    student = tiny_model(4)
    result = train(small_run(tmp_path, steps=1, lr=1e-9, init_from=str(tmp_path / "k1")), student)
    expected, got = lora_tensors(teacher), lora_tensors(result.model)
    assert expected.keys() == got.keys()
    for name in expected:  # lr 1e-9 and the warm-up's zero first step: no update at all
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7)


def test_warm_start_refuses_another_lora_rank(tiny_model, tmp_path):
    tiny_model(1, lora_r=4).save_pretrained(tmp_path / "k1")
    with pytest.raises(KMergeConfigError, match="does not match this model's"):
        train(small_run(tmp_path, init_from=str(tmp_path / "k1")), tiny_model(4))


# ------------------------------------------------------------------ distillation
@pytest.mark.parametrize("teacher", ["checkpoint", "base"])
def test_distillation_is_zero_when_student_is_the_teacher_at_k1(
    tiny_model, tiny_base, tokenizer, tmp_path, teacher
):
    from kmerge.distillation import Distiller

    student = tiny_model(1)
    if teacher == "checkpoint":
        randomise_trainables(student, seed=2)
        student.save_pretrained(tmp_path / "k1")
        source = KMergeModel.from_pretrained(tmp_path / "k1", base=tiny_base(), tokenizer=tokenizer)
    else:
        source = "base"  # a fresh LoRA is exactly zero: the student is the base model
    prompts = TREE_PROMPTS[:3]
    answers = ["true", "false", "true"]
    distiller = Distiller(student, source, kl_weight=2.0, hidden_weight=1.0, prompt_weight=1.0)
    result = distiller(student, prompts, answers)
    assert result.kl == pytest.approx(0.0, abs=1e-5)
    assert result.hidden == pytest.approx(0.0, abs=1e-4)
    assert result.prompt_hidden == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(result.loss, result.output.loss, rtol=0, atol=1e-4)


def test_distillation_penalises_a_compressed_student(tiny_model):
    from kmerge.distillation import Distiller

    student = tiny_model(4)
    randomise_trainables(student, seed=4)
    result = Distiller(student, "base", kl_weight=1.0, hidden_weight=1.0)(
        student, TREE_PROMPTS[:3], ["true", "false", "true"]
    )
    assert result.kl > 1e-4 and result.hidden > 1e-3
    result.loss.backward()  # the distillation terms reach the student's trainables
    assert student.encoder.mlp[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layers, bos", [(0, False), (1, False), (1, True)])
def test_prompt_distillation_matches_each_block_to_its_last_token(tiny_model, layers, bos):
    """The prompt term compares merged position j with the teacher at its block's last token
    (over every layer, or the first ``layers``, for which the teacher runs only those): computed
    by hand from the two models' hidden states, it is what the Distiller reports, and its
    gradient reaches the encoder alone (no answer terms). The first and last blocks are left
    out, also after a BOS."""
    from kmerge.distillation import Distiller, normalised_distance

    # three layers: with layers=1 the teacher runs two of them (one more than it matches)
    student = tiny_model(
        4, block_alignment="segments", prepend_bos=bos, base_overrides={"num_hidden_layers": 3}
    )
    randomise_trainables(student, seed=4)
    n_layers = len(student.lm.get_decoder().layers)
    if layers:  # the teacher's forward stops early
        calls = []
        student.lm.get_decoder().layers[2].register_forward_hook(lambda *a: calls.append(1))
    prompts, answers = TREE_PROMPTS[:3], ["true", "false", "true"]
    distiller = Distiller(student, "base", kl_weight=0.0, prompt_weight=1.0, prompt_layers=layers)
    result = distiller(student, prompts, answers)
    assert len(student.lm.get_decoder().layers) == n_layers  # the teacher's cut is undone
    assert not layers or len(calls) == 1  # the student's forward alone ran the third layer
    assert result.prompt_hidden > 1e-3 and result.kl == 0.0 and result.hidden == 0.0
    result.loss.backward()
    assert student.encoder.mlp[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        own, teacher = [], []
        for prompt, answer in zip(prompts, answers):  # one by one: no padding involved
            batch = student.prepare([prompt], [answer])
            ends = batch.block_ends[0]
            inner = list(range(1, len(ends) - 1))
            own.append(student.answer_states(batch, prompt_positions=[inner]).prompt_hidden)
            with student.peft_model.disable_adapter():
                plain = student.prepare([prompt], [answer], k=1)
                at_ends = [[ends[j] for j in inner]]
                teacher.append(student.answer_states(plain, prompt_positions=at_ends).prompt_hidden)
        keep = layers or n_layers
        expected = normalised_distance(
            [torch.cat(layer) for layer in zip(*own)][:keep],
            [torch.cat(layer) for layer in zip(*teacher)][:keep],
        )
    assert result.prompt_hidden == pytest.approx(float(expected), rel=1e-4)


def test_a_match_only_step_runs_the_matched_layers_and_trains_the_match_alone(tiny_model):
    """A warm-up step: the same prompt distance as a full step, computed with the student's
    decoder cut to the matched layers (+1, whose output comes normed), nothing else in the loss,
    and its gradient reaching the encoder."""
    from kmerge.distillation import Distiller

    student = tiny_model(4, block_alignment="segments", base_overrides={"num_hidden_layers": 4})
    randomise_trainables(student, seed=4)
    prompts, answers = TREE_PROMPTS[:3], ["true", "false", "true"]
    distiller = Distiller(
        student, "base", kl_weight=1.0, hidden_weight=1.0, prompt_weight=2.0, prompt_layers=1
    )
    full = distiller(student, prompts, answers)
    calls = []
    student.lm.get_decoder().layers[2].register_forward_hook(lambda *a: calls.append(1))
    warm = distiller(student, prompts, answers, match_only=True)
    assert calls == []  # neither the teacher nor the student ran the third layer
    assert len(student.lm.get_decoder().layers) == 4  # the cut is undone
    assert warm.prompt_hidden == pytest.approx(full.prompt_hidden, rel=1e-5)
    assert warm.kl == warm.hidden == 0.0 and full.kl > 0 and full.hidden > 0
    assert float(warm.loss.detach()) == pytest.approx(2.0 * warm.prompt_hidden, rel=1e-5)
    warm.loss.backward()
    assert student.encoder.mlp[-1].weight.grad.abs().sum() > 0
    with pytest.raises(KMergeConfigError, match="match-only step needs the prompt term"):
        Distiller(student, "base", prompt_weight=1.0, prompt_layers=0)(
            student, prompts, answers, match_only=True
        )


def test_match_warmup_comes_first_and_logs_its_own_loss(tiny_model, tmp_path):
    model = tiny_model(4, base_overrides={"num_hidden_layers": 3})
    decoder_calls = []
    model.lm.get_decoder().layers[2].register_forward_hook(  # training forwards, not evaluation
        lambda layer, *a: decoder_calls.append(1) if layer.training else None
    )
    cfg = small_run(
        tmp_path,
        steps=8,
        eval_every=1,
        teacher="base",
        distill_prompt_layers=1,
        distill_match_warmup=0.25,
    )
    history = train(cfg, model).history
    records = [r for r in history if "lr" in r]
    # no evaluation inside the warm-up (it would score an untrained answer); one at its end
    assert [r["step"] for r in history if "eval_accuracy" in r] == list(range(2, 9))
    assert [("match_loss" in r, "loss" in r) for r in records] == [(True, False)] * 2 + [
        (False, True)
    ] * 6  # log_every=1: the first quarter of the steps, each under its own name
    assert all(r["distill_prompt"] > 0 for r in records)
    assert len(decoder_calls) == 6  # the third layer ran in the task steps' student only
    with pytest.raises(KMergeConfigError, match="distill_match_warmup must be below 1"):
        small_run(tmp_path, teacher="base", distill_match_warmup=1.0)
    for wrong in ({}, {"teacher": "base", "distill_prompt_layers": 0}):
        with pytest.raises(KMergeConfigError, match="needs a teacher, distill_prompt_weight > 0"):
            small_run(tmp_path, distill_match_warmup=0.5, **wrong)


def test_prompt_distillation_refuses_a_teacher_that_tokenises_otherwise(tiny_model, tmp_path):
    from kmerge.distillation import Distiller

    teacher = tiny_model(1, prompt_compressor="random_drop", compression_ratio=2.0)
    student = tiny_model(4)
    distiller = Distiller(student, teacher, kl_weight=0.0, prompt_weight=1.0)
    with pytest.raises(KMergeConfigError, match="prompt has .* tokens, the teacher's"):
        distiller(student, TREE_PROMPTS[:2], ["true", "false"])


def test_training_with_a_teacher_logs_its_cost(tiny_model, tmp_path):
    cfg = small_run(tmp_path, teacher="base", distill_hidden_weight=1.0, distill_prompt_weight=1.0)
    result = train(cfg, tiny_model(4))
    logged = [r for r in result.history if "loss" in r]
    assert len(logged) == 6 and all(r["teacher_seconds"] > 0 for r in logged)
    # the run's total: at least what the last log saw, and part of the training time
    assert logged[-1]["teacher_seconds"] <= result.teacher_seconds < result.train_seconds
    assert all(r["distill_prompt"] > 0 and r["distill_hidden"] > 0 for r in logged)


def test_distill_until_drops_the_teacher_for_the_rest_of_the_run(tiny_model, tmp_path):
    cfg = small_run(tmp_path, steps=8, teacher="base", distill_until=0.5)
    result = train(cfg, tiny_model(4))
    logged = [r for r in result.history if "loss" in r]  # log_every=1: one record per step
    assert [("distill_prompt" in r) for r in logged] == [True] * 4 + [False] * 4
    cost = [r["teacher_seconds"] for r in logged]
    assert cost[0] > 0 and cost[3] > cost[2] and cost[4:] == [cost[3]] * 4  # paid no more
    assert result.teacher_seconds == cost[3]
    with pytest.raises(KMergeConfigError, match="must be above distill_match_warmup"):
        small_run(tmp_path, teacher="base", distill_match_warmup=0.3, distill_until=0.3)
    with pytest.raises(KMergeConfigError, match="distill_until"):
        small_run(tmp_path, teacher="base", distill_until=1.5)


def test_a_teacher_alone_distils_the_prompt_and_refuses_zero_weights(tiny_model, tmp_path):
    # --teacher alone is the measured recipe: prompt distillation, no answer-token KL
    logged = [
        r for r in train(small_run(tmp_path, teacher="base"), tiny_model(4)).history if "loss" in r
    ]
    assert all(r["distill_prompt"] > 0 and r["distill_kl"] == 0 for r in logged)
    with pytest.raises(KMergeConfigError, match="every distillation weight at 0 distils nothing"):
        small_run(tmp_path, teacher="base", distill_prompt_weight=0.0)


def test_cached_teacher_gives_the_same_loss_and_is_not_run_again(tiny_model):
    from kmerge.distillation import Distiller

    student = tiny_model(4)
    randomise_trainables(student, seed=4)
    prompts, answers = TREE_PROMPTS[:3], ["true", "false", "true"]
    plain = Distiller(student, "base", kl_weight=1.0, hidden_weight=1.0)
    cached = Distiller(student, "base", kl_weight=1.0, hidden_weight=1.0, cache=True)
    expected = plain(student, prompts, answers)
    first = cached(student, prompts[:2], answers[:2])  # fills two of the three
    assert cached.cache_hits == 0 and len(cached.cache) == 2 and first.teacher_seconds > 0
    again = cached(student, prompts, answers)  # one teacher forward, for the third only
    assert cached.cache_hits == 2 and len(cached.cache) == 3
    # float16 storage: the loss moves by less than its rounding
    assert again.kl == pytest.approx(expected.kl, rel=1e-2, abs=1e-5)
    assert again.hidden == pytest.approx(expected.hidden, rel=1e-2)
    calls = []
    cached._teacher_forward = lambda *a: calls.append(a)  # must not be needed any more
    cached(student, prompts[::-1], answers[::-1])
    assert calls == [] and cached.cache_hits == 5


def test_training_with_a_cached_teacher_logs_its_hits(tiny_model, tmp_path):
    cfg = small_run(tmp_path, teacher="base", distill_cache=True, n_train=8, batch_size=4)
    logged = [r for r in train(cfg, tiny_model(4)).history if "loss" in r]
    assert logged[-1]["teacher_cache_hits"] > 0  # 8 examples, more than 8 drawn


def test_protect_surprising_keeps_the_most_surprising_share_raw(tiny_model):
    from kmerge.methods.self_information import token_surprisal

    model = tiny_model(4, protect_surprising=0.25)
    prompt = TREE_PROMPTS[0]
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = model.tokenizer.bos_token_id
    scores = token_surprisal(model.lm, [ids], start)[0]
    keep = -(-len(ids) // 4)
    top = sorted(range(len(ids)), key=lambda t: (-scores[t], t))[:keep]
    flags = model.protected_flags([prompt], [ids], None)[0]
    assert [t for t, f in enumerate(flags) if f] == sorted(top)
    assert model.prepare([prompt]).raw_positions == [keep]
    randomise_trainables(model, seed=9)
    prompts = TREE_PROMPTS[:4]
    check_batch_equals_single(model, prompts, answers_for(prompts))


def test_balanced_classes_are_equally_frequent_and_deterministic():
    from collections import Counter

    from kmerge.tasks import Example
    from kmerge.training import balanced

    examples = [Example(f"r{i}", "positive") for i in range(17)] + [
        Example(f"n{i}", "negative") for i in range(3)
    ]
    out = balanced(examples, seed=0)
    assert len(out) == 20 and Counter(e.answer for e in out) == {"positive": 10, "negative": 10}
    assert {e.prompt for e in out if e.answer == "negative"} == {"n0", "n1", "n2"}
    assert out == balanced(examples, seed=0) and out != balanced(examples, seed=1)
    with pytest.raises(KMergeDataError, match="at least two different answers"):
        balanced(examples[:5], seed=0)


def test_k_schedule_walks_the_choices_in_order(tiny_model, tmp_path):
    model = tiny_model(4)
    calls = spy_on_forward(model)
    train(small_run(tmp_path, steps=9, k_choices=[1, 2, 4], k_order="schedule"), model)
    assert ks_of(calls) == [1, 1, 1, 2, 2, 2, 4, 4, 4]


def test_jsonl_rows_can_protect_their_own_spans(tiny_model, tmp_path):
    from kmerge.tasks.base import example_protect_spans

    rows = [
        {"prompt": "Context: one two three four five. Question: which?", "answer": "five",
         "protect": "Question: which?"},
        {"prompt": "Context: six seven eight nine ten. Question: which?", "answer": "ten"},
    ]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("jsonl", train_file=str(path), eval_file=str(path))
    examples = sorted(task.examples("test"), key=lambda e: e.answer)
    spans = example_protect_spans(examples)
    start = rows[0]["prompt"].index("Question")
    assert spans == [[(start, start + len("Question: which?"))], []]
    model = tiny_model(4)
    batch = model.prepare([e.prompt for e in examples], protect=spans)
    assert batch.raw_positions[0] >= 3 and batch.raw_positions[1] == 0
    result = evaluate(model, examples, task, progress=False)  # the spans reach evaluation
    assert result["mean_positions_fed"] == pytest.approx(sum(batch.positions_fed) / 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "abc", "answer": "x", "protect": "zzz"}) + "\n")
    with pytest.raises(KMergeDataError, match="'zzz' does not occur in the prompt"):
        get_task("jsonl", train_file=str(bad)).examples("train")


# ------------------------------------------------------------------ spread position ids
def fed_positions(batch, row: int = 0) -> list[int]:
    return batch.position_ids[row][batch.attention_mask[row].bool()].tolist()


def test_spread_positions_are_block_ends_then_the_plain_answer_positions(tiny_model, tokenizer):
    model = tiny_model(4, spread_positions=True)
    prompt = PROMPTS[0]
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    batch = model.prepare([prompt], ["yes"])
    positions, n_blocks = fed_positions(batch), -(-n // 4)
    assert positions[:n_blocks] == [min(4 * (i + 1), n) - 1 for i in range(n_blocks)]
    assert positions[n_blocks:] == list(range(n, n + len(positions) - n_blocks))
    plain = tiny_model(1, spread_positions=True).prepare([prompt], ["yes"])
    assert fed_positions(plain) == list(range(len(fed_positions(plain))))  # K=1: unchanged


@pytest.mark.parametrize("align", ["start", "end", "segments"])
def test_spread_positions_batch_equals_single(tiny_model, tokenizer, align):
    model = tiny_model(4, block_alignment=align, spread_positions=True, protect_last=2)
    randomise_trainables(model, seed=11)
    prompts = ragged_prompts(tokenizer, 4) + TREE_PROMPTS[:2]
    check_batch_equals_single(model, prompts, answers_for(prompts))


def test_spread_positions_cached_generation_equals_uncached(tiny_model, tokenizer):
    """Generation continues from the last prompt id + 1 (transformers' generate does), the
    position the answer had in training. The reference passes its attention mask: without one,
    transformers reads jumps in position ids as packed sequences and masks across them."""
    model = tiny_model(4, spread_positions=True)
    randomise_trainables(model, seed=5)
    embed, eos = model.lm.get_input_embeddings(), tokenizer.eos_token_id
    for prompt in (PROMPTS[0], PROMPTS[2]):
        batch, generated = model.prepare([prompt]), []
        with torch.no_grad():
            for _ in range(8):
                new = embed(torch.tensor([generated], dtype=torch.long))
                embeds = torch.cat([batch.inputs_embeds, new], dim=1)
                last = int(batch.position_ids[0, -1])
                extra = torch.arange(last + 1, last + 1 + len(generated))[None]
                positions = torch.cat([batch.position_ids, extra], dim=1)
                mask = torch.ones(positions.shape, dtype=torch.long)
                hidden = model.lm.get_decoder()(
                    inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                    use_cache=False,
                ).last_hidden_state  # fmt: skip
                generated.append(int(model.lm.get_output_embeddings()(hidden[:, -1]).argmax()))
        expected = generated[: generated.index(eos)] if eos in generated else generated
        cached = model.generate_ids([prompt], max_new_tokens=8)[0]
        assert_greedy_equivalent(model, prompt, cached, expected)


def test_spread_positions_count_against_the_context(tiny_model):
    prompt = "word " * 400  # 100 merged positions, but ids up to 400: over the context of 256
    assert len(fed_positions(tiny_model(4).prepare([prompt]))) <= 256
    with pytest.raises(KMergeDataError, match="the model's context is 256"):
        tiny_model(4, spread_positions=True).prepare([prompt])


def test_reconstruction_example_repeats_the_prompt_after_a_raw_instruction(tiny_model, tokenizer):
    example = Example(TREE_PROMPTS[0], "true", meta={"protect": ["Parent/Child"]})
    recon = reconstruction_example(example)
    assert recon.answer == example.prompt
    assert recon.prompt == example.prompt + RECONSTRUCT_INSTRUCTION
    model = tiny_model(4)
    with torch.no_grad():
        batch = model.prepare([recon.prompt], protect=example_protect_spans([recon]))
    n_instruction = len(tokenizer(RECONSTRUCT_INSTRUCTION, add_special_tokens=False)["input_ids"])
    n_kept = len(tokenizer("/Child", add_special_tokens=False)["input_ids"]) + 1  # + "Parent"
    assert batch.raw_positions == [n_instruction + n_kept]  # both texts stay ordinary tokens


@pytest.mark.parametrize(
    "prompt, expected_cut",
    [
        ("one two three four", 7),  # the whitespace nearest the middle (9) is at 7
        ("Review: great product, works well. Label:", 22),
        ("nowhitespace", 6),  # no whitespace: the middle character
        (" x", 1),  # a cut at 0 would leave no prompt
    ],
)
def test_continuation_example_cuts_at_the_whitespace_nearest_the_middle(prompt, expected_cut):
    example = Example(prompt, "positive", meta={"protect": ["Label:"]})
    cont = continuation_example(example)
    assert cont.prompt == prompt[:expected_cut] and cont.answer == prompt[expected_cut:]
    assert cont.prompt + cont.answer == prompt  # nothing lost, nothing added
    assert cont.meta == example.meta
    assert reconstruction_example(example, "continue") == cont


def test_training_with_continuation_steps(tiny_model, tmp_path):
    """--reconstruct-objective continue: the reconstruction steps (and only they) train the
    model to write the second half of each prompt after its merged first half."""
    model = tiny_model(4)
    calls = spy_on_forward(model)
    cfg = small_run(tmp_path, steps=8, reconstruct_share=0.25, reconstruct_objective="continue")
    train(cfg, model)
    task_prompts = {p for prompts, _, _ in calls for p in prompts if "Answer:" in p}
    assert task_prompts  # the task's steps see whole prompts
    for step, (prompts, answers, _) in enumerate(calls):
        continued = is_reconstruction_step(step, 0.25)
        assert all(("Answer:" not in p) == continued for p in prompts)
        if continued:
            assert all(a[0].isspace() and p for p, a in zip(prompts, answers))


def test_continuation_objective_needs_reconstruction_steps(tmp_path):
    with pytest.raises(KMergeConfigError, match="needs reconstruction steps"):
        small_run(tmp_path, reconstruct_objective="continue")


def test_reconstruction_steps_are_spread_evenly():
    steps = [s for s in range(40) if is_reconstruction_step(s, 0.25)]
    assert steps == list(range(3, 40, 4))
    assert sum(is_reconstruction_step(s, 0.1) for s in range(1000)) == 100
    assert not any(is_reconstruction_step(s, 0.0) for s in range(100))


def test_training_with_reconstruction_steps(tiny_model, tmp_path):
    model = tiny_model(4)
    calls = spy_on_forward(model)
    result = train(small_run(tmp_path, steps=8, reconstruct_share=0.25), model)
    kinds = [
        answers == [p.removesuffix(RECONSTRUCT_INSTRUCTION) for p in prompts]
        for prompts, answers, _ in calls
    ]
    assert kinds == [is_reconstruction_step(s, 0.25) for s in range(8)]
    for (prompts, _, options), recon in zip(calls, kinds):
        assert all(p.endswith(RECONSTRUCT_INSTRUCTION) == recon for p in prompts)
        assert ("protect" in options) == recon  # the instruction is fed raw
    records = [r for r in result.history if "lr" in r]
    assert [("loss" in r, "reconstruct_loss" in r) for r in records] == [
        (not recon, recon) for recon in kinds
    ]  # log_every=1: each record is one step, its loss under its own name
    assert all(math.isfinite(r.get("loss", r.get("reconstruct_loss"))) for r in records)


def test_reconstruction_warmup_comes_first(tiny_model, tmp_path):
    model = tiny_model(4)
    calls = spy_on_forward(model)
    result = train(small_run(tmp_path, steps=8, eval_every=1, reconstruct_warmup=0.25), model)
    assert [r["step"] for r in result.history if "eval_accuracy" in r] == list(range(2, 9))
    kinds = [all(p.endswith(RECONSTRUCT_INSTRUCTION) for p in prompts) for prompts, _, _ in calls]
    assert kinds == [True, True] + [False] * 6  # the first quarter of the steps


@pytest.mark.parametrize("name", ["reconstruct_share", "reconstruct_warmup"])
def test_reconstruction_needs_merged_prompts(name):
    with pytest.raises(KMergeConfigError, match=f"{name} needs K > 1"):
        TrainConfig(model=KMergeConfig(k=1), **{name: 0.2})
    with pytest.raises(KMergeConfigError, match=f"{name} must be below 1"):
        TrainConfig(model=KMergeConfig(k=4), **{name: 1.0})


# ------------------------------------------------------------------ focal loss
def test_focal_loss_weights_each_answer_token_by_its_error(tiny_model):
    """(1 - p)^gamma * CE per answer token, p the right token's probability computed here from
    the logits; gamma 0 is the plain loss, and a confident token weighs less than an unsure one."""
    model = tiny_model(4)
    randomise_trainables(model, seed=6)
    prompts, answers = TREE_PROMPTS[:3], ["true", "false", "true"]
    states = model.answer_states(model.prepare(prompts, answers))
    out = states.output
    torch.testing.assert_close(out.focal_loss(0.0), out.loss, rtol=0, atol=0)
    # each example's tokens, in batch order, add up to its mean loss times its token count
    per_example = out.token_losses.split(out.answer_tokens.tolist())
    torch.testing.assert_close(
        torch.stack([t.sum() for t in per_example]), out.example_losses * out.answer_tokens
    )
    targets = model.prepare(prompts, answers).labels[:, 1:]
    targets = targets[targets != -100]
    p = states.logits.float().softmax(-1).gather(1, targets[:, None])[:, 0]
    expected = ((1 - p) ** 2 * -p.log()).mean()
    torch.testing.assert_close(out.focal_loss(2.0), expected, rtol=1e-4, atol=1e-6)
    assert out.focal_loss(2.0) < out.loss
    weight = (1 - p) ** 2
    assert weight[p.argmax()] == weight.min()  # the most confident token weighs least


def test_training_with_focal_loss_optimises_it(tiny_model, tmp_path):
    """The same first batch from the same start: the step logs the focal loss, below the plain
    cross-entropy, and the two runs end with different weights."""
    logged, trained = {}, {}
    for gamma in (0.0, 2.0):
        model = tiny_model(4)
        cfg = small_run(tmp_path / str(gamma), steps=2, focal_gamma=gamma)
        logged[gamma] = [r["loss"] for r in train(cfg, model).history if "loss" in r]
        trained[gamma] = lora_tensors(model)
    assert 0 < logged[2.0][0] < logged[0.0][0]
    assert any(not torch.equal(trained[0.0][n], t) for n, t in trained[2.0].items())


def test_distillation_uses_the_focal_loss_for_the_student_s_own_term(tiny_model):
    from kmerge.distillation import Distiller

    student = tiny_model(4)
    randomise_trainables(student, seed=4)
    distiller = Distiller(student, "base", kl_weight=0.0, focal_gamma=2.0)
    result = distiller(student, TREE_PROMPTS[:3], ["true", "false", "true"])
    torch.testing.assert_close(result.loss, result.output.focal_loss(2.0))
    assert result.loss < result.output.loss
