"""Where a model errs on the Textualized Tree: accuracy by question type and by block layout.

    .venv/bin/python benchmarks/tree_errors.py runs/q/k4seg-s0/checkpoint --n 512

Question types (from the tree): ``edge`` (X is Y's parent: the only "true"), ``reversed``
(Y is X's parent), ``grandparent`` / ``grandchild`` (two levels apart on one branch),
``siblings`` (same parent), ``other``; each also split by whether the root is one of the two
names. Layout: whether the names X and Y each sit whole inside one merged block of the
prompt's tree part, or are cut across two blocks. Spelling: whether the question spells both
names with the same tokens as the tree does (the root: " FY" after "Tree:" and after
"Parent:"), shares a token with it for each (" Z" "K" against "Z" "K"), or not for at least one
(" FY" against "F" "Y").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch

from kmerge.evaluation import evaluate
from kmerge.modeling import KMergeModel
from kmerge.tasks import get_task
from kmerge.training import TrainConfig, load_data


def question_type(tree: str, x: str, y: str) -> str:
    depth, parent, stack = {}, {}, []
    for line in tree.split("\n"):
        name = line.lstrip("+")
        d = len(line) - len(name)
        stack = stack[:d]
        if stack:
            parent[name] = stack[-1]
        stack.append(name)
        depth[name] = d
    if parent.get(y) == x:
        return "edge"
    if parent.get(x) == y:
        return "reversed"
    if parent.get(parent.get(y)) == x:
        return "grandparent"
    if parent.get(parent.get(x)) == y:
        return "grandchild"
    if x in parent and parent.get(x) == parent.get(y):
        return "siblings"
    return "other"


def covering_tokens(model: KMergeModel, prompt: str, start: int, name: str) -> list[int]:
    """Positions of the prompt's tokens that cover ``name`` at character ``start``."""
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    chars = range(start, start + len(name))
    return [t for t, (a, b) in enumerate(enc["offset_mapping"]) if any(a <= c < b for c in chars)]


def name_cut(model: KMergeModel, prompt: str, tree: str, name: str) -> bool:
    """True when the first occurrence of ``name`` in the tree is split across two blocks."""
    tokens = covering_tokens(model, prompt, prompt.index(tree) + tree.index(name), name)
    spans = model.prompt_layouts([prompt])[0]
    block_of = {t: i for i, (a, b, _) in enumerate(spans) for t in range(a, b)}
    return len({block_of[t] for t in tokens}) > 1


def spelling(model: KMergeModel, prompt: str, tree: str, name: str) -> str:
    """'same', 'shared' or 'none': how the question's tokens of ``name`` relate to the tree's."""
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    in_tree, in_question = (
        [ids[t] for t in covering_tokens(model, prompt, start, name)]
        for start in (prompt.index(tree) + tree.index(name), prompt.rindex(" " + name) + 1)
    )
    if in_tree == in_question:
        return "same"
    return "shared" if set(in_tree) & set(in_question) else "none"


def held_out(
    checkpoint: str | Path, n: int, tokenizer, seed: int | None = None, stage: str | None = None
) -> list:
    """The held-out questions of the run that wrote ``checkpoint`` (its ``train_config.json``,
    one folder up), as it evaluated them: they depend on the run's seed and on how many
    training examples it drew (held-out trees exclude those). ``seed`` and ``stage`` ask for
    other questions; without a run config, those of the default settings."""
    run = Path(checkpoint).parent
    has_run = (run / "train_config.json").is_file()
    cfg = TrainConfig.from_run(run) if has_run else TrainConfig()
    if cfg.task != "tree":
        raise SystemExit(f"{checkpoint} was trained on task {cfg.task!r}, not the tree")
    changes = {"n_eval": n, "resume": False, "output_dir": None}
    if seed is not None:
        changes["seed"] = seed
    if stage is None and cfg.curriculum:  # the checkpoint of a curriculum ends on its last
        stage = cfg.curriculum[-1]
    return load_data(dataclasses.replace(cfg, **changes), tokenizer, stage=stage).held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--stage", default=None, help="another stage (default: the run's)")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--k", type=int, default=None, help="evaluate at another K")
    parser.add_argument(
        "--seed", type=int, default=None,
        help="held-out trees of this seed (default: the run's own, as it evaluated them)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    model = KMergeModel.from_pretrained(args.checkpoint).merge_lora()
    examples = held_out(args.checkpoint, args.n, model.tokenizer, args.seed, args.stage)
    result = evaluate(model, examples, get_task("tree"), k=args.k, progress=False)
    groups: dict[str, list[bool]] = defaultdict(list)
    for example, prediction in zip(examples, result["predictions"]):
        meta = example.meta
        hit = prediction.strip().lower() == example.answer
        kind = question_type(meta["tree"], meta["parent"], meta["child"])
        groups["type: " + kind].append(hit)
        # The root's line opens the prompt: merged, it shares position 0 (an attention sink).
        root = meta["tree"].split("\n")[0]
        asked = "with" if root in (meta["parent"], meta["child"]) else "without"
        groups[f"type: {kind}, {asked} the root"].append(hit)
        spelt = [
            spelling(model, example.prompt, meta["tree"], n)
            for n in (meta["parent"], meta["child"])
        ]
        spelt_as = "none" if "none" in spelt else "shared" if "shared" in spelt else "same"
        groups[f"question spells the names: {spelt_as}"].append(hit)
        if model.k > 1:
            cut = any(name_cut(model, example.prompt, meta["tree"], n)
                      for n in (meta["parent"], meta["child"]))  # fmt: skip
            groups["names " + ("cut across blocks" if cut else "each in one block")].append(hit)
    report = {
        "checkpoint": args.checkpoint,
        "held_out": {"n": len(examples), "seed": "the run's" if args.seed is None else args.seed},
        "accuracy": result["accuracy"],
        "compression": result["compression"],
        "groups": {
            g: {"n": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(groups.items())
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
