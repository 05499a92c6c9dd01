"""Textualized Tree benchmark ("K-Token Merging"): is X the parent of Y in a rendered tree?

A tree is rendered one node per line, one '+' per depth level, in pre-order:

    AA
    +BB
    ++CC
    +DD

Each question asks about an ordered pair of distinct nodes; answer "true" iff the first is
the parent of the second. Reversed edges are included among the negatives (hard negatives).
"""

from __future__ import annotations

import itertools
import random
import string
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

from kmerge.tasks.base import Example, KMergeDataError, Task, check_split, register_task


@dataclass(frozen=True)
class TreeStage:
    max_depth: int
    max_nodes: int
    min_children: int
    max_children: int


# Curriculum order matters: STAGE_ORDER goes from easiest to hardest.
STAGES: dict[str, TreeStage] = {
    "small": TreeStage(2, 3, 0, 2),
    "xsmall": TreeStage(3, 5, 0, 2),
    "medium": TreeStage(3, 10, 0, 3),
    "xmedium": TreeStage(4, 15, 1, 3),
    "large": TreeStage(4, 30, 1, 3),
    "x3large": TreeStage(4, 150, 3, 5),
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)

NODE_NAMES: tuple[str, ...] = tuple(
    a + b for a, b in itertools.product(string.ascii_uppercase, repeat=2)
)

# The test split rejects trees seen in at least this many train examples (see make_tree_examples).
DEFAULT_TRAIN_REFERENCE = 4096


@dataclass
class Tree:
    nodes: list[str]  # render (pre-order) order
    parent: dict[str, str]  # child -> parent; the root has no entry
    depth: dict[str, int]
    children: dict[str, list[str]] = field(default_factory=dict)  # in creation order


def get_stage(stage: str) -> TreeStage:
    if stage not in STAGES:
        raise KMergeDataError(
            f"unknown tree stage {stage!r}; valid stages: {', '.join(STAGE_ORDER)}"
        )
    return STAGES[stage]


def generate_tree(rng: random.Random, stage: TreeStage) -> Tree:
    """Grow a random tree breadth-first, within the stage's depth, size and fan-out limits."""
    if not 1 <= stage.max_nodes <= len(NODE_NAMES):
        raise KMergeDataError(f"max_nodes {stage.max_nodes} outside 1..{len(NODE_NAMES)}")
    # Names are unique within a tree: draw them all up front, hand them out in creation order.
    names = rng.sample(NODE_NAMES, stage.max_nodes)
    root = names[0]
    depth = {root: 0}
    parent: dict[str, str] = {}
    children: dict[str, list[str]] = {root: []}
    used = 1
    queue = deque([root])
    while queue:
        node = queue.popleft()
        if depth[node] >= stage.max_depth:
            continue
        k = rng.randint(stage.min_children, stage.max_children)
        k = min(k, stage.max_nodes - used)  # the node budget caps fan-out
        for child in names[used : used + k]:
            parent[child] = node
            depth[child] = depth[node] + 1
            children[child] = []
            children[node].append(child)
            queue.append(child)
        used += k

    order: list[str] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))  # first child is visited first
    return Tree(nodes=order, parent=parent, depth=depth, children=children)


def render_tree(tree: Tree) -> str:
    return "\n".join("+" * tree.depth[n] + n for n in tree.nodes)


def tree_prompt(tree_text: str, parent: str, child: str) -> str:
    return (
        f"Tree: {tree_text}, Task: Parent/Child Relationship, "
        f"Parent: {parent}, Child: {child}, Answer:"
    )


def tree_questions(
    tree: Tree, rng: random.Random, balance: bool = True, ancestor_share: float = 0.0
) -> list[tuple[str, str, bool]]:
    """(parent, child, is_edge) questions for one tree; empty for a single-node tree.

    Balanced questions alternate true/false, so truncating the list keeps the classes within 1.
    ``ancestor_share``: see ``_draw_falses`` (0 draws the false questions uniformly).
    """
    trues = [(tree.parent[c], c) for c in tree.nodes if c in tree.parent]
    falses = [(x, y) for x in tree.nodes for y in tree.nodes if x != y and tree.parent.get(y) != x]
    if not balance:
        return [(p, c, True) for p, c in trues] + [(p, c, False) for p, c in falses]
    k = min(len(trues), len(falses))
    trues = rng.sample(trues, k) if k < len(trues) else trues
    falses = _draw_falses(tree, falses, k, rng, ancestor_share)
    out = []
    for t, f in zip(trues, falses, strict=True):
        out += [(*t, True), (*f, False)]
    return out


def _is_far_ancestor(tree: Tree, x: str, y: str) -> bool:
    """True when ``x`` sits two or more levels above ``y`` on ``y``'s branch (a grandparent)."""
    node = tree.parent.get(tree.parent.get(y, ""))
    while node is not None:
        if node == x:
            return True
        node = tree.parent.get(node)
    return False


def _draw_falses(
    tree: Tree, falses: list[tuple[str, str]], k: int, rng: random.Random, ancestor_share: float
) -> list[tuple[str, str]]:
    """``k`` of the false pairs; each is, with chance ``ancestor_share``, a far ancestor (a
    grandparent or above, the pair a model that reads "above on the same branch" for "parent"
    answers wrongly), while the tree has one left, else any other false pair."""
    if not ancestor_share:
        return rng.sample(falses, k)  # the uniform draw, RNG use unchanged
    far: list[tuple[str, str]] = []
    rest: list[tuple[str, str]] = []
    for pair in falses:
        (far if _is_far_ancestor(tree, *pair) else rest).append(pair)
    n_far = min(len(far), sum(rng.random() < ancestor_share for _ in range(k)))
    n_rest = min(len(rest), k - n_far)
    picked = rng.sample(far, k - n_rest) + rng.sample(rest, n_rest)
    rng.shuffle(picked)
    return picked


def _tree_stream(stage: str, seed: int, split: str):
    """Endless stream of (tree, text) for a split; single-node trees are skipped.

    Trees come from their own RNG so that the sequence does not depend on n or balance: the
    first trees of a split are always the same, which makes the train/test rejection exact.
    """
    spec = get_stage(stage)
    rng = random.Random(f"{seed}-{split}-{stage}")  # string seed: stable across processes
    while True:
        tree = generate_tree(rng, spec)
        if len(tree.nodes) > 1:
            yield tree, render_tree(tree)


@lru_cache(maxsize=32)
def _train_tree_texts(stage: str, seed: int, n_examples: int) -> frozenset[str]:
    """Texts of the train trees that any train split of <= n_examples examples can use.

    Counted with balanced questions (2 per edge), the fewest per tree, so the prefix also
    covers an unbalanced train split of the same size.
    """
    texts: set[str] = set()
    count = 0
    for tree, text in _tree_stream(stage, seed, "train"):
        if count >= n_examples:
            break
        texts.add(text)
        count += 2 * (len(tree.nodes) - 1)
    return frozenset(texts)


def make_tree_examples(
    stage: str,
    n_examples: int,
    seed: int,
    split: str,
    balance: bool = True,
    *,
    train_reference: int | None = None,
    ancestor_share: float = 0.0,
) -> list[Example]:
    """Deterministic Tree examples for (stage, n_examples, seed, split, balance).

    The split is by tree: train and test trees come from separate RNG streams, and a test tree
    whose text occurs among the train trees is rejected. The rejection set covers the train
    trees of max(n_examples, train_reference, 4096) train examples; a train split larger
    than that could, rarely, share a tree with the test split. ``ancestor_share`` changes which
    false questions a tree gets (``_draw_falses``), never which trees a split has.
    """
    check_split(split)
    get_stage(stage)
    if not isinstance(n_examples, int) or n_examples < 1:
        raise KMergeDataError(f"n_examples must be a positive integer, got {n_examples!r}")
    seen: frozenset[str] = frozenset()
    if split == "test":
        ref = max(n_examples, train_reference or 0, DEFAULT_TRAIN_REFERENCE)
        seen = _train_tree_texts(stage, seed, ref)

    # Questions and the final shuffle use a second RNG, keeping the tree stream fixed.
    rng = random.Random(f"{seed}-{split}-{stage}-questions")
    examples: list[Example] = []
    for tree, text in _tree_stream(stage, seed, split):
        if len(examples) >= n_examples:
            break
        if text in seen:
            continue
        for p, c, is_edge in tree_questions(tree, rng, balance, ancestor_share):
            meta = {"tree": text, "parent": p, "child": c, "stage": stage}
            examples.append(Example(tree_prompt(text, p, c), "true" if is_edge else "false", meta))
    del examples[n_examples:]  # cut inside the last tree, before shuffling
    rng.shuffle(examples)
    return examples


@register_task("tree")
class TreeTask(Task):
    """The Textualized Tree parent/child task at one curriculum stage."""

    answer_choices = ("true", "false")
    query_pattern = r"Parent: \S+, Child: \S+, Answer:$"
    generates_examples = True
    stages = STAGE_ORDER

    @classmethod
    def run_options(cls, stage: str, n_eval: int, n_train: int | None) -> dict:
        options = {"stage": stage, "n_test": n_eval}
        return options if n_train is None else options | {"n_train": n_train}

    def __init__(
        self,
        stage: str = "small",
        seed: int = 0,
        balance: bool = True,
        n_train: int = 2048,
        n_test: int = 256,
        ancestor_negatives: float = 0.0,
    ) -> None:
        get_stage(stage)
        if not 0.0 <= ancestor_negatives <= 1.0:
            raise KMergeDataError(
                f"ancestor_negatives is a share between 0 and 1, got {ancestor_negatives!r}"
            )
        self.ancestor_negatives = ancestor_negatives
        self.stage = stage
        self.seed = seed
        self.balance = balance
        self.n_train = n_train
        self.n_test = n_test

    def _examples(self, split: str, n: int | None) -> list[Example]:
        if n is None:
            n = self.n_train if split == "train" else self.n_test
        # Held-out questions stay uniform: the option changes what the model practises only.
        share = self.ancestor_negatives if split == "train" else 0.0
        return make_tree_examples(
            self.stage, n, self.seed, split, self.balance, train_reference=self.n_train,
            ancestor_share=share,
        )  # fmt: skip
