"""What a model trained with reconstruction steps can read back from merged tree prompts.

    .venv/bin/python benchmarks/reconstruction_probe.py runs/q/k4seg-rec25-s0/checkpoint --n 40

The model (trained with ``--reconstruct-share``) is asked to repeat held-out tree prompts
(``kmerge.reconstruction``'s instruction, fed raw after the merged prompt) and its greedy
output is compared with the prompt, tree line by tree line: the whole line, its depth (the
number of ``+``) and its node name, each right or wrong; and the two names the question asks
about (``question_names``, of two per prompt). It tells apart what merging leaves
readable to the language model from what it does not.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from kmerge.modeling import KMergeModel
from kmerge.reconstruction import reconstruction_example
from kmerge.tasks.base import example_protect_spans
from kmerge.tasks.tree import make_tree_examples


def tree_lines(text: str) -> list[str]:
    """The tree lines of a tree prompt (or of a model's attempt at one); [] if none."""
    if "Tree: " not in text:
        return []
    return text.split("Tree: ", 1)[1].split(", Task", 1)[0].split("\n")


def question_names(text: str) -> tuple[str, str] | None:
    """The (parent, child) a tree prompt (or a model's attempt at one) asks about."""
    match = re.search(r"Parent: (\S+), Child: (\S+), Answer:", text)
    return match.groups() if match else None


def depth(line: str) -> int:
    return len(line) - len(line.lstrip("+"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=40, help="held-out prompts")
    parser.add_argument("--stage", default="small")
    parser.add_argument("--show", type=int, default=3, help="print this many prompt/output pairs")
    args = parser.parse_args()

    model = KMergeModel.from_pretrained(args.checkpoint).eval()
    held_out = make_tree_examples(args.stage, args.n, 0, "test")
    examples = [reconstruction_example(e) for e in held_out]
    longest = max(len(model.tokenizer(e.answer)["input_ids"]) for e in examples)
    batch = model.prepare(
        [e.prompt for e in examples], reserve=longest + 4, protect=example_protect_spans(examples)
    )
    with torch.no_grad():
        outputs = model.tokenizer.batch_decode(model.generate_ids(batch, longest + 4))
    keys = ["prompts", "prompts_exact", "question_names", "lines", "line", "depth", "name"]
    counts = dict.fromkeys(keys, 0)
    for example, output in zip(examples, outputs):
        counts["prompts"] += 1
        counts["prompts_exact"] += output.strip() == example.answer
        asked, said = question_names(example.answer), question_names(output)
        counts["question_names"] += sum(a == b for a, b in zip(asked, said or ("", "")))
        got = tree_lines(output)
        for i, line in enumerate(tree_lines(example.answer)):
            mine = got[i] if i < len(got) else ""
            counts["lines"] += 1
            counts["line"] += mine == line
            counts["depth"] += depth(mine) == depth(line)
            counts["name"] += mine.lstrip("+") == line.lstrip("+")
    for example, output in list(zip(examples, outputs))[: args.show]:
        print(f"prompt: {example.answer!r}\nrepeat: {output.strip()!r}")
    n = counts["lines"]
    shares = {key: counts[key] / n for key in ("line", "depth", "name")}
    shares["question_names"] = counts["question_names"] / (2 * counts["prompts"])
    print(json.dumps({"checkpoint": args.checkpoint, **counts, "share": shares}))


if __name__ == "__main__":
    main()
