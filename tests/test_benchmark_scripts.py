"""Helpers of the diagnostic scripts in benchmarks/ whose numbers docs/quality.md quotes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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
    from kmerge.tasks import get_task

    task = get_task("tree", stage="small", n_test=200)
    examples = task.examples("test")
    kinds = [tree_errors.question_type(e.meta["tree"], e.meta["parent"], e.meta["child"])
             for e in examples]  # fmt: skip
    assert [k == "edge" for k in kinds] == [e.answer == "true" for e in examples]
    assert {"edge", "reversed"} <= set(kinds)
