"""`kmerge train` on the Textualized Tree with the names spelt as the question spells them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tree_spelling.py spaced \\
        --stage small --k 4 --block-alignment segments --output-dir runs/q/k4seg-spaced-s0

A diagnostic, not the benchmark. The paper's rendering puts each name right after its depth
marks (``+FY``), so a name is other tokens in the tree (``F`` ``Y``) than in the question
(`` FY``), except the root's, which follows ``Tree: `` as the question's names follow
``Parent: ``. ``spaced`` renders ``+ FY``: every name is the same tokens in both places. If
merged prompts learn much faster this way, the spelling is what they find hard
(docs/quality.md, "Does the question's spelling of a name matter?"). ``paper`` is the
unchanged benchmark. Every argument after the spelling goes to ``kmerge train``.
"""

from __future__ import annotations

import sys

import kmerge.tasks.tree as tree_task
from kmerge.cli import main as kmerge_main


def spaced(tree: tree_task.Tree) -> str:
    """The root as the paper renders it (``Tree: QW``), every other line ``+ FY``."""
    return "\n".join("+" * tree.depth[n] + (" " if tree.depth[n] else "") + n for n in tree.nodes)


RENDERINGS = {"paper": tree_task.render_tree, "spaced": spaced}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in RENDERINGS:
        raise SystemExit(f"usage: tree_spelling.py {{{','.join(RENDERINGS)}}} [kmerge train args]")
    tree_task.render_tree = RENDERINGS[argv[0]]  # read at call time by the tree stream
    kmerge_main(["train", "--task", "tree", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
