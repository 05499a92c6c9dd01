"""Tree benchmark: answers checked against an independent parser of the rendered text."""

import random
import re
from collections import Counter, defaultdict

import pytest

from kmerge.tasks import Example, KMergeDataError, get_task
from kmerge.tasks.tree import (
    STAGE_ORDER,
    STAGES,
    TreeStage,
    TreeTask,
    generate_tree,
    make_tree_examples,
    render_tree,
)

NAME = re.compile(r"^[A-Z]{2}$")
PROMPT = re.compile(
    r"^Tree: (?P<tree>[A-Z+\n]+), Task: Parent/Child Relationship, "
    r"Parent: (?P<p>[A-Z]{2}), Child: (?P<c>[A-Z]{2}), Answer:$"
)


def parse_tree(text: str) -> tuple[dict[str, str], dict[str, int]]:
    """Rebuild child->parent and depth from the '+' prefixes (pre-order rendering)."""
    parent, depth, stack = {}, {}, []  # stack[d] = the latest node seen at depth d
    for line in text.split("\n"):
        name = line.lstrip("+")
        d = len(line) - len(name)
        assert NAME.match(name), line
        assert name not in depth, f"duplicate node {name}"
        assert d <= len(stack) and (d > 0 or not stack), f"bad depth jump at {line!r}"
        del stack[d:]
        if d:
            parent[name] = stack[d - 1]
        stack.append(name)
        depth[name] = d
    return parent, depth


def test_stage_table():
    assert STAGE_ORDER == ("small", "xsmall", "medium", "xmedium", "large", "x3large")
    assert STAGES["small"] == TreeStage(2, 3, 0, 2)
    assert STAGES["x3large"] == TreeStage(4, 150, 3, 5)


def test_render_example():
    rng = random.Random(0)
    tree = generate_tree(rng, TreeStage(3, 4, 1, 1))  # forced chain
    a, b, c, d = tree.nodes
    assert render_tree(tree) == f"{a}\n+{b}\n++{c}\n+++{d}"


@pytest.mark.parametrize("stage_name", STAGE_ORDER)
def test_stage_limits(stage_name):
    stage = STAGES[stage_name]
    for seed in range(150):
        tree = generate_tree(random.Random(seed), stage)
        parent, depth = parse_tree(render_tree(tree))
        assert parent == tree.parent and depth == tree.depth
        assert len(depth) <= stage.max_nodes
        assert max(depth.values()) <= stage.max_depth
        kids = Counter(parent.values())
        budget_spent = len(depth) == stage.max_nodes
        for node, d in depth.items():
            if d == stage.max_depth:
                assert kids[node] == 0
            else:
                assert kids[node] <= stage.max_children
                assert kids[node] >= stage.min_children or budget_spent


@pytest.mark.parametrize("stage", STAGE_ORDER)
@pytest.mark.parametrize("balance", [True, False])
def test_answers_match_parsed_tree(stage, balance):
    examples = make_tree_examples(stage, 300, seed=1, split="train", balance=balance)
    assert len(examples) == 300
    for ex in examples:
        m = PROMPT.match(ex.prompt)
        assert m, ex.prompt
        assert (m["tree"], m["p"], m["c"]) == (ex.meta["tree"], ex.meta["parent"], ex.meta["child"])
        assert ex.meta["stage"] == stage
        parent, _ = parse_tree(m["tree"])
        assert m["p"] != m["c"] and {m["p"], m["c"]} <= parent.keys() | set(parent.values())
        assert ex.answer == ("true" if parent.get(m["c"]) == m["p"] else "false")


def test_prompt_format_exact():
    ex = make_tree_examples("small", 1, seed=0, split="train")[0]
    t, p, c = ex.meta["tree"], ex.meta["parent"], ex.meta["child"]
    expected = f"Tree: {t}, Task: Parent/Child Relationship, Parent: {p}, Child: {c}, Answer:"
    assert ex.prompt == expected
    assert ex.answer in ("true", "false")


@pytest.mark.parametrize("stage", ["small", "medium", "x3large"])
def test_balance(stage):
    examples = make_tree_examples(stage, 1000, seed=2, split="train")
    assert Counter(e.answer for e in examples) == {"true": 500, "false": 500}
    by_tree = defaultdict(Counter)
    for e in examples:
        by_tree[e.meta["tree"]][e.answer] += 1
    # Every tree is balanced except possibly the one cut at the end, by at most one.
    off = [c for c in by_tree.values() if c["true"] != c["false"]]
    assert len(off) <= 1 and all(abs(c["true"] - c["false"]) <= 1 for c in off)


def test_unbalanced_has_all_pairs():
    examples = make_tree_examples("small", 500, seed=3, split="train", balance=False)
    by_tree = defaultdict(set)
    for e in examples:
        by_tree[e.meta["tree"]].add((e.meta["parent"], e.meta["child"]))
    n_nodes = {tree: tree.count("\n") + 1 for tree in by_tree}
    full = [t for t, pairs in by_tree.items() if len(pairs) == n_nodes[t] * (n_nodes[t] - 1)]
    assert len(full) >= len(by_tree) - 1  # only the last tree may be cut


def test_reversed_edges_are_negatives():
    examples = make_tree_examples("medium", 2000, seed=4, split="train", balance=False)
    key = [(e.meta["tree"], e.meta["parent"], e.meta["child"]) for e in examples]
    edges = {k for k, e in zip(key, examples, strict=True) if e.answer == "true"}
    reversed_neg = [
        e
        for (t, p, c), e in zip(key, examples, strict=True)
        if e.answer == "false" and (t, c, p) in edges
    ]
    assert reversed_neg


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_train_test_trees_disjoint(stage):
    task = TreeTask(stage=stage, seed=5)
    train = {e.meta["tree"] for e in task.examples("train")}
    test = {e.meta["tree"] for e in task.examples("test")}
    assert train and test and not train & test


def test_test_split_rejects_train_trees():
    # The rejection set covers the first 4096 train examples even when n_train is smaller.
    train = {e.meta["tree"] for e in make_tree_examples("small", 4096, 0, "train")}
    test = {e.meta["tree"] for e in make_tree_examples("small", 2000, 0, "test")}
    assert not train & test


def test_deterministic():
    a = make_tree_examples("xsmall", 200, seed=7, split="test")
    b = make_tree_examples("xsmall", 200, seed=7, split="test")
    assert a == b and [e.meta for e in a] == [e.meta for e in b]
    assert a != make_tree_examples("xsmall", 200, seed=8, split="test")
    assert a != make_tree_examples("xsmall", 200, seed=7, split="train")


def test_task_api():
    task = get_task("tree", stage="xsmall", n_train=64, n_test=16)
    assert isinstance(task, TreeTask) and task.name == "tree"
    assert task.answer_choices == ("true", "false")
    assert len(task.examples("train")) == 64
    assert len(task.examples("test")) == 16
    assert len(task.examples("test", n=10)) == 10
    assert all(isinstance(e, Example) for e in task.examples("train"))


def test_node_names_unique_two_letter():
    for seed in range(20):
        tree = generate_tree(random.Random(seed), STAGES["x3large"])
        assert len(set(tree.nodes)) == len(tree.nodes)
        assert all(NAME.match(n) for n in tree.nodes)


def test_bad_stage_and_split():
    with pytest.raises(KMergeDataError, match=r"'huge'.*small, xsmall"):
        TreeTask(stage="huge")
    with pytest.raises(KMergeDataError, match="'dev'"):
        TreeTask().examples("dev")
    with pytest.raises(KMergeDataError, match="'valid'"):
        make_tree_examples("small", 10, 0, "valid")


def far_ancestor_share(examples: list[Example]) -> float:
    """Share of the false questions whose parent is a grandparent (or higher) of the child,
    by the independent parser."""
    far = falses = 0
    for e in examples:
        if e.answer != "false":
            continue
        parent, _ = parse_tree(e.meta["tree"])
        falses += 1
        node = parent.get(parent.get(e.meta["child"], ""))
        while node is not None and node != e.meta["parent"]:
            node = parent.get(node)
        far += node is not None
    return far / falses


@pytest.mark.parametrize("stage", ["small", "medium"])
def test_ancestor_negatives_train_only(stage):
    plain = TreeTask(stage=stage, seed=3, n_train=2000, n_test=500)
    hard = TreeTask(stage=stage, seed=3, n_train=2000, n_test=500, ancestor_negatives=1.0)
    train_plain, train_hard = plain.examples("train"), hard.examples("train")
    # Same trees, still balanced; more grandparent questions among the falses.
    assert train_plain
    assert {e.meta["tree"] for e in train_plain} == {e.meta["tree"] for e in train_hard}
    assert Counter(e.answer for e in train_hard) == {"true": 1000, "false": 1000}
    assert far_ancestor_share(train_hard) > 1.5 * far_ancestor_share(train_plain) > 0
    # Every answer still agrees with the parser (a far ancestor is never the parent).
    for e in train_hard:
        parent, _ = parse_tree(e.meta["tree"])
        assert (parent.get(e.meta["child"]) == e.meta["parent"]) == (e.answer == "true")
    # Held-out questions are exactly those without the option.
    assert hard.examples("test") == plain.examples("test")


def test_ancestor_share_grows_the_far_ancestor_questions():
    half = make_tree_examples("medium", 3000, seed=1, split="train", ancestor_share=0.5)
    full = make_tree_examples("medium", 3000, seed=1, split="train", ancestor_share=1.0)
    plain = make_tree_examples("medium", 3000, seed=1, split="train")
    assert far_ancestor_share(plain) < far_ancestor_share(half) < far_ancestor_share(full)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_ancestor_negatives_out_of_range(share):
    with pytest.raises(KMergeDataError, match="ancestor_negatives is a share between 0 and 1"):
        TreeTask(ancestor_negatives=share)
    with pytest.raises(KMergeDataError, match="does not take ancestor_negatives"):
        get_task("amazon_reviews", ancestor_negatives=0.5)
