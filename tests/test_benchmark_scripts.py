"""Helpers of the diagnostic scripts in benchmarks/ whose numbers docs/quality.md quotes."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from kmerge.evaluation import evaluate
from kmerge.tasks import get_task
from kmerge.tasks.base import Example, Task
from tests.conftest import randomise_trainables

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def frozen_probe():
    return load_script("frozen_probe")


def test_ridge_probe_scores_separable_classes_perfectly_and_noise_near_chance(frozen_probe):
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.arange(96) % 2, torch.arange(64) % 2
    shift = torch.zeros(16)
    shift[3] = 4.0  # the classes differ along one direction only

    def points(y):
        return torch.randn(len(y), 16, generator=g) + y.unsqueeze(1) * shift

    choices = ["negative", "positive"]
    assert frozen_probe.ridge_f1(points(y_tr), y_tr, points(y_te), y_te, choices) == 1.0
    noise_tr, noise_te = torch.randn(96, 16, generator=g), torch.randn(64, 16, generator=g)
    assert frozen_probe.ridge_f1(noise_tr, y_tr, noise_te, y_te, choices) < 0.75


def test_ridge_probe_weights_the_classes_alike(frozen_probe):
    """With 15 of 16 training examples in one class, a probe on features that tell the classes
    apart (though not cleanly) still finds the small class on balanced held-out data; an
    unweighted fit answers the large class every time there (macro-F1 1/3)."""
    g = torch.Generator().manual_seed(1)
    y_tr = (torch.arange(256) % 16 == 0).long()
    y_te = torch.arange(128) % 2
    shift = torch.zeros(8)
    shift[0] = 2.0

    def points(y):
        return torch.randn(len(y), 8, generator=g) + y.unsqueeze(1) * shift

    score = frozen_probe.ridge_f1(points(y_tr), y_tr, points(y_te), y_te, ["a", "b"])
    assert score > 0.65


@pytest.mark.parametrize("k", [1, 4])
def test_probe_features_batched_equal_one_by_one(frozen_probe, tiny_model, k):
    """Left padding must not leak into the features: the last real position and the mean over
    real positions are the same whether a prompt is read alone or beside longer ones."""
    model = tiny_model(4)
    prompts = ["a b", "a b c d e f g h i", "c d e f g"]
    together = frozen_probe.features(model, prompts, k, [0, 1, 2], batch=3)
    alone = [frozen_probe.features(model, [p], k, [0, 1, 2], batch=1) for p in prompts]
    assert set(together) == {(layer, w) for layer in (0, 1, 2) for w in ("last", "mean")}
    for key, value in together.items():
        assert value.shape[0] == 3
        torch.testing.assert_close(value, torch.cat([a[key] for a in alone]), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tree_errors():
    return load_script("tree_errors")


def test_tree_question_types_by_hand(tree_errors):
    tree = "A\n+B\n++C\n++D\n+E"
    kinds = {
        ("A", "B"): "edge",
        ("B", "A"): "reversed",
        ("A", "C"): "grandparent",
        ("C", "A"): "grandchild",
        ("C", "D"): "siblings",
        ("B", "E"): "siblings",
        ("C", "E"): "other",
    }
    for (x, y), kind in kinds.items():
        assert tree_errors.question_type(tree, x, y) == kind, (x, y)


def test_tree_question_type_edge_is_exactly_the_true_answers(tree_errors):
    """The diagnostic's reading of a tree agrees with the task's generator: a question is an
    ``edge`` exactly when its answer is "true"."""

    task = get_task("tree", stage="small", n_test=200)
    examples = task.examples("test")
    kinds = [tree_errors.question_type(e.meta["tree"], e.meta["parent"], e.meta["child"])
             for e in examples]  # fmt: skip
    assert [k == "edge" for k in kinds] == [e.answer == "true" for e in examples]
    assert {"edge", "reversed"} <= set(kinds)


@pytest.fixture(scope="module")
def merge_probe():
    return load_script("merge_probe")


def random_pairs(g: torch.Generator, n: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n blocks of two distinct token ids in 1..vocab-1, both orders equally likely."""
    first = torch.randint(1, vocab, (n,), generator=g)
    second = (first + torch.randint(1, vocab - 1, (n,), generator=g) - 1) % (vocab - 1) + 1
    return torch.stack([first, second], dim=1), torch.ones(n, 2, dtype=torch.bool)


def test_merge_probe_reads_the_bag_of_a_mean_but_not_its_order(merge_probe):
    """What docs/quality.md reads from the probe: a block mean keeps which tokens a block holds
    (bag recall near 1) and not their order (a mean of (a, b) is the mean of (b, a): slot accuracy
    near 1/2); an encoder whose MLP is not zero does keep order; single tokens are the ceiling."""
    from kmerge.encoder import MergeEncoder

    g = torch.Generator().manual_seed(0)
    embed = torch.nn.Embedding(12, 48)
    torch.nn.init.normal_(embed.weight, generator=g)
    train, test = random_pairs(g, 600, 12), random_pairs(g, 300, 12)
    mean = merge_probe.probe(MergeEncoder(48, 2).eval(), embed, train, test, 2)
    assert mean["bag_recall"] > 0.95 and mean["blocks"] == 300
    assert max(mean["slot_accuracy"]) < 0.65
    ordered = MergeEncoder(48, 2).eval()
    with torch.no_grad():
        for p in ordered.parameters():
            p.normal_(generator=g)
    assert min(merge_probe.probe(ordered, embed, train, test, 2)["slot_accuracy"]) > 0.8
    singles = [(ids[:, :1], mask[:, :1]) for ids, mask in (train, test)]
    single = merge_probe.probe(MergeEncoder(48, 1).eval(), embed, *singles, 1)
    assert single["slot_accuracy"] == [1.0]


@pytest.mark.parametrize("protect", [None, r"[,:]"])
def test_merge_probe_lays_blocks_out_as_the_model_does(merge_probe, tiny_model, tokenizer,
                                                       protect):  # fmt: skip
    """Probing a segment-aligned checkpoint merges the blocks its model merges, not the paper
    layout's; protected tokens are never merged, so they are no probe blocks."""
    from kmerge.tasks.tree import make_tree_examples

    prompts = [e.prompt for e in make_tree_examples("small", 4, 0, "test")]
    model = tiny_model(4, block_alignment="segments", protect_pattern=protect)
    _, mask = merge_probe.blocks_of(prompts, tokenizer, 4, model.prompt_layouts)
    batch = model.prepare(prompts)
    raw = [[r for *_, r in spans] for spans in model.prompt_layouts(prompts)]
    merged = [
        b - a
        for ends, flags in zip(batch.block_ends, raw)
        for a, b, r in zip([-1, *ends[:-1]], ends, flags)
        if not r
    ]
    assert mask.sum(dim=1).tolist() == merged
    assert len(merged) == sum(map(len, batch.block_ends)) - sum(batch.raw_positions)
    _, paper = merge_probe.blocks_of(prompts, tokenizer, 4)
    assert paper.sum(dim=1).tolist() != merged


@pytest.fixture(scope="module")
def reconstruction_probe():
    return load_script("reconstruction_probe")


def test_reconstruction_probe_reads_lines_depths_and_question_names(reconstruction_probe):
    from kmerge.tasks.tree import tree_prompt

    prompt = tree_prompt("JR\n+UF\n++OH", "UF", "OH")
    assert reconstruction_probe.tree_lines(prompt) == ["JR", "+UF", "++OH"]
    assert [reconstruction_probe.depth(line) for line in ["JR", "+UF", "++OH"]] == [0, 1, 2]
    assert reconstruction_probe.question_names(prompt) == ("UF", "OH")
    # a model's garbled attempt: what it cannot parse counts as wrong, not as a crash
    assert reconstruction_probe.tree_lines("Repeat: nothing") == []
    assert reconstruction_probe.question_names("Tree: JR, Parent: UF") is None


@pytest.mark.parametrize(
    "overrides",
    [{"seed": 1}, {"steps": 600, "batch_size": 64}, {"curriculum": ["small", "xsmall"]}],
)
def test_tree_errors_evaluates_the_questions_the_run_evaluated(tree_errors, tokenizer, tmp_path,
                                                               overrides):  # fmt: skip
    """The held-out trees depend on the run's seed and on how many training examples it drew
    (the test split leaves out trees it could have trained on): read from its config, they are
    the questions the run was evaluated on (a curriculum's checkpoint: its last stage's)."""
    from kmerge.modeling import KMergeConfig
    from kmerge.training import TrainConfig, load_data

    cfg = TrainConfig(model=KMergeConfig(k=4), n_eval=64, **overrides)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    questions = tree_errors.held_out(tmp_path / "checkpoint", 64, tokenizer)
    stage = cfg.curriculum[-1] if cfg.curriculum else None
    assert questions == load_data(cfg, tokenizer, stage=stage).held_out
    default = tree_errors.held_out(tmp_path / "elsewhere" / "checkpoint", 64, tokenizer)
    assert default == load_data(TrainConfig(n_eval=64), tokenizer).held_out
    if cfg.seed != 0:  # another seed's trees are other questions
        assert questions != default
    assert tree_errors.held_out(tmp_path / "checkpoint", 64, tokenizer, seed=5) != questions


def fake_run(path, curve: list[tuple[float, float]], steps: int) -> None:
    """A finished run's metrics.jsonl (loss records and eval records) and results.json."""
    path.mkdir(parents=True)
    records = [{"step": 1, "loss": 0.7}]
    records += [{"step": i + 1, "train_seconds": s, "eval_accuracy": a} for i, (s, a) in
                enumerate(curve)]  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    final = {"accuracy": curve[-1][1], "compression": 3.3, "mean_positions_fed": 8.8, "n": 512}
    results = {"final_eval": final, "steps": steps, "train_seconds": curve[-1][0]}
    (path / "results.json").write_text(json.dumps(results))


def test_quality_curves_table_and_plot(tmp_path, capsys, monkeypatch):
    """Runs sharing a label are one curve; the table has each run's final numbers; a label per
    run is required."""
    curves = load_script("quality_curves")
    fake_run(tmp_path / "a-s0", [(10.0, 0.5), (20.0, 0.7)], 40)
    fake_run(tmp_path / "a-s1", [(12.0, 0.6), (22.0, 0.8)], 44)
    fake_run(tmp_path / "b-s0", [(10.0, 0.5)], 20)
    assert curves.eval_curve(tmp_path / "a-s0", "accuracy") == [(10.0, 0.5), (20.0, 0.7)]
    png = tmp_path / "img" / "curves.png"
    runs = [str(tmp_path / n) for n in ("a-s0", "a-s1", "b-s0")]
    monkeypatch.setattr("sys.argv", ["quality_curves", *runs, "--labels", "A,A,B",
                                     "--output", str(png), "--table"])  # fmt: skip
    curves.main()
    out = capsys.readouterr().out
    assert png.stat().st_size > 0
    rows = [line for line in out.splitlines() if line.startswith(("A |", "B |"))]
    assert rows == [
        "A | a-s0 | 70.0% | 3.30x | 8.8 | 40 | 20 | 512",
        "A | a-s1 | 80.0% | 3.30x | 8.8 | 44 | 22 | 512",
        "B | b-s0 | 50.0% | 3.30x | 8.8 | 20 | 10 | 512",
    ]
    monkeypatch.setattr("sys.argv", ["quality_curves", *runs, "--labels", "A,B"])
    with pytest.raises(SystemExit):
        curves.main()


def test_quality_curves_averages_runs_over_shared_seconds_not_by_index():
    """Two runs with different evaluation counts: the mean at each second interpolates both
    runs there (the old point-by-point mean paired a mid-run point with a final one); runs
    that share no seconds are not averaged."""
    curves = load_script("quality_curves")
    long = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.9)]
    short = [(10.0, 0.5), (25.0, 0.8)]
    xs, mean, low, high = curves.mean_curve([long, short])
    assert xs == [10.0, 20.0, 25.0]  # the shared range ends with the shorter run
    # at 20 s: long 0.7, short 0.5 + 0.3 * 10 / 15 = 0.7; at 25 s: long 0.8, short 0.8
    assert mean == pytest.approx([0.5, 0.7, 0.8])
    assert low == pytest.approx([0.5, 0.7, 0.8]) and high == pytest.approx([0.5, 0.7, 0.8])
    xs, mean, low, high = curves.mean_curve([[(0.0, 0.2), (10.0, 0.4)], [(0.0, 0.6), (10.0, 0.6)]])
    assert mean == pytest.approx([0.4, 0.5]) and low == pytest.approx([0.2, 0.4])
    assert high == pytest.approx([0.6, 0.6])
    assert curves.mean_curve([[(0.0, 0.1), (5.0, 0.2)], [(6.0, 0.3), (9.0, 0.4)]]) is None


def test_quality_curves_reads_a_stopped_run_from_its_last_evaluation(tmp_path, capsys, monkeypatch):
    curves = load_script("quality_curves")
    fake_run(tmp_path / "stopped", [(10.0, 0.5), (20.0, 0.75)], 40)
    (tmp_path / "stopped" / "results.json").unlink()  # stopped by a signal before its end
    with (tmp_path / "stopped" / "metrics.jsonl").open("r+") as f:
        rows = [json.loads(line) for line in f]
        rows[-1] |= {"eval_compression": 1.0, "eval_mean_positions_fed": 29.0}
        f.seek(0)
        f.write(
            "".join(json.dumps(r) + "\n" for r in [{"step": 0, "data": {"n_eval": 512}}, *rows])
        )
    monkeypatch.setattr("sys.argv", ["quality_curves", str(tmp_path / "stopped"), "--table"])
    curves.main()
    row = "stopped | stopped (no final evaluation; last at step 2) | 75.0% | 1.00x | 29.0 | 2 | 20"
    assert f"{row} | 512" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    monkeypatch.setattr("sys.argv", ["quality_curves", str(tmp_path / "empty"), "--table"])
    with pytest.raises(SystemExit, match="no evaluation in metrics.jsonl yet"):
        curves.main()


@pytest.fixture(scope="module")
def serve_load():
    return load_script("serve_load")


def test_serve_load_quantile_is_the_nearest_rank(serve_load):
    values = [float(v) for v in range(1, 101)]
    assert serve_load._quantile(values, 0.99) == 99.0  # not the slowest of 100
    assert serve_load._quantile(values, 0.5) == 50.0
    assert serve_load._quantile(values[:4], 0.99) == 4.0  # few samples: the slowest
    assert serve_load._quantile(values[:3], 0.5) == 2.0
    assert serve_load._quantile([7.0], 0.0) == 7.0


def test_serve_load_goals_are_ratios_of_the_measured_points(serve_load):
    def point(scheduling, k, clients, ttft, tokens_per_s):
        return {"scheduling": scheduling, "k": k, "clients": clients, "ttft_p50_s": ttft,
                "output_tokens_per_s": tokens_per_s}  # fmt: skip

    points = [point("batched", 1, 1, 0.8, 10.0), point("batched", 4, 1, 0.2, 12.0),
              point("batched", 1, 16, 4.0, 60.0), point("batched", 4, 16, 1.0, 90.0),
              point("one_at_a_time", 4, 16, 2.0, 30.0)]  # fmt: skip
    assert serve_load.goals(points, [1, 16], [1, 4]) == {
        "ttft_p50_k1_over_k4_at_1": 4.0,
        "ttft_p50_k1_over_k4_at_16": 4.0,
        "batching_throughput_gain_k4_at_16": 3.0,  # K=1 has no one-at-a-time point: no ratio
    }


def test_profile_prefill_profiles_three_arms_and_writes_traces(tiny_dir, tmp_path, monkeypatch,
                                                                capsys):  # fmt: skip
    script = load_script("profile_prefill")
    argv = ["profile_prefill", "--base-model", str(tiny_dir), "--length", "48", "--k", "4",
            "--repeats", "1", "--output-dir", str(tmp_path / "profile")]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    script.main()
    traces = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert traces == ["kmerge-LoRA_merged-L48-K4.json", "kmerge-LoRA_unmerged-L48-K4.json",
                      "raw_model_at_LK-L48-K4.json"]  # fmt: skip
    for name in traces:
        assert json.loads((tmp_path / "profile" / name).read_text())["traceEvents"]
    table = capsys.readouterr().out.split("prefills per arm\n")[1].splitlines()[2:5]
    arms = {row.split(" | ")[0]: int(row.split(" | ")[2]) for row in table}
    assert set(arms) == {"kmerge, LoRA unmerged", "kmerge, LoRA merged", "raw model at L/K"}
    # LoRA folded into the weights drops the adapters' extra matmuls
    assert arms["kmerge, LoRA merged"] < arms["kmerge, LoRA unmerged"]
    assert arms["raw model at L/K"] > 0


@pytest.fixture(scope="module")
def late_merge_bound():
    return load_script("late_merge_bound")


def _answer_losses(script, model, layers, prompts, answers):
    late = script.LateMask(model, layers)
    try:
        with torch.no_grad():
            return script.answer_nll(model, late, prompts, answers).example_losses
    finally:
        late.remove()


def test_late_merge_bound_batched_equals_one_by_one_and_no_mask_is_the_plain_model(
    late_merge_bound, tiny_model
):
    model = tiny_model(4)
    prompts, answers = ["a b", "a b c d e f g h i", "c d e f g"], ["x", "y z", "w"]
    layers = len(model.lm.get_decoder().layers)
    plain = model.loss(model.prepare(prompts, answers, k=1)).example_losses
    unmasked = _answer_losses(late_merge_bound, model, layers, prompts, answers)
    torch.testing.assert_close(unmasked, plain)
    together = _answer_losses(late_merge_bound, model, 1, prompts, answers)
    alone = torch.cat([_answer_losses(late_merge_bound, model, 1, [p], [a])
                       for p, a in zip(prompts, answers)])  # fmt: skip
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together, plain)  # the mask is in force from layer 1 on


def test_late_merge_bound_choice_scores_are_evaluate_at_k1_with_no_layer_masked(
    late_merge_bound, tiny_model
):
    """With the mask in force at no layer, the bound's choice accuracy and ROC-AUC are what
    ``evaluate`` reports for the same model at K=1; with it in force they are computed from
    the masked losses (a different model, so at least the AUC moves)."""

    class Sentiment(Task):
        name = "sentiment-test"
        answer_choices = ("negative", "positive")
        metrics = ("choice_accuracy",)
        primary_metric = "choice_accuracy"

    texts = ["great shirt, fits well", "fell apart after one wash", "love it",
             "too small and the colour is wrong", "ok for the price, would buy again",
             "the seams split on day two"]  # fmt: skip
    labels = ["positive", "negative", "positive", "negative", "positive", "negative"]
    examples = [Example(f"Review: {t}, Label:", a) for t, a in zip(texts, labels)]
    model = tiny_model(4, base_overrides={"initializer_range": 0.3})
    randomise_trainables(model, seed=1, std=0.05)
    layers = len(model.lm.get_decoder().layers)
    late = late_merge_bound.LateMask(model, layers)
    try:
        scores = late_merge_bound.choice_scores(model, late, examples, Sentiment.answer_choices)
    finally:
        late.remove()
    reference = evaluate(model, examples, Sentiment(), progress=False, k=1)
    assert scores["accuracy"] == pytest.approx(reference["choice_accuracy"])
    assert scores["auc"] == pytest.approx(reference["choice_auc"])
    late = late_merge_bound.LateMask(model, 0)
    try:
        masked = late_merge_bound.choice_scores(model, late, examples, Sentiment.answer_choices)
    finally:
        late.remove()
    assert masked["auc"] != pytest.approx(scores["auc"])


def test_late_merge_bound_trains_past_the_end_of_its_data_epoch_after_epoch(late_merge_bound):
    """More steps than one pass over the data: full batches, each epoch a new order, the first
    epoch the order the script always used (so earlier runs reproduce)."""
    examples = list(range(10))
    batches = late_merge_bound.epoch_batches(examples, 3, seed=7)
    drawn = [next(batches) for _ in range(9)]  # three per epoch (the 10th example left over)
    first = list(examples)
    random.Random(7).shuffle(first)
    assert drawn[:3] == [first[0:3], first[3:6], first[6:9]]
    assert all(len(batch) == 3 for batch in drawn)
    for epoch in range(3):
        seen = sum(drawn[3 * epoch : 3 * epoch + 3], [])
        assert len(set(seen)) == 9 and set(seen) <= set(examples)
    assert drawn[3:6] != drawn[:3]
    with pytest.raises(SystemExit, match="fewer than one batch"):
        next(late_merge_bound.epoch_batches([1, 2], 3, seed=0))


def test_late_merge_bound_hides_tokens_that_end_no_block(late_merge_bound, tiny_model):
    """At L = 0 the answer reads only the blocks' last tokens: changing a token inside a block
    changes nothing; at L = 1 the first layer reads it, so the answer's loss moves."""
    model = tiny_model(4)
    base, edited = "a b c d e f g h", "a q c d e f g h"  # the 2nd token ends no block of 4
    spans = model.prompt_layouts([base])[0]
    changed = model.tokenizer(edited)["input_ids"]
    assert len(changed) == len(model.tokenizer(base)["input_ids"])
    assert all(end - 1 != 1 for _, end, _ in spans)
    for layers, same in ((0, True), (1, False)):
        a, b = (_answer_losses(late_merge_bound, model, layers, [p], ["x"]) for p in (base, edited))
        assert torch.allclose(a, b, atol=1e-6) == same


def test_bf16_benchmark_times_two_kernels_of_the_same_attention():
    """The eager kernel it times against SDPA computes the same causal attention."""
    bf16_cpu = load_script("bf16_cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    eager, sdpa = bf16_cpu.eager_attention(q, k, v), bf16_cpu.sdpa_attention(q, k, v)
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager[..., 0, :], v[..., 0, :])  # causal: the first sees itself
