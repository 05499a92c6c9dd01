"""The learned pooling scores of an encoder trained with ``--merge-pooling attention``.

    .venv/bin/python benchmarks/pooling_scores.py runs/q/k4seg-attn-s0/checkpoint --n 2

Prints, for the tokens of a few held-out tree prompts, the score the encoder gives each token
(the softmax over a block's scores are its weights in the merged vector; all zero is the plain
mean), and the norm of the score vector.
"""

from __future__ import annotations

import argparse

import torch

from kmerge.modeling import KMergeModel
from kmerge.tasks.tree import make_tree_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=2, help="held-out prompts to show")
    args = parser.parse_args()
    model = KMergeModel.from_pretrained(args.checkpoint).eval()
    if model.encoder.pool_score is None:
        parser.error(f"{args.checkpoint} was not trained with --merge-pooling attention")
    weight = model.encoder.pool_score.weight[0]
    embeddings = model.lm.get_input_embeddings().weight
    print(f"score vector norm {weight.norm().item():.4f}")
    with torch.no_grad():
        for example in make_tree_examples("small", args.n, 0, "test"):
            ids = model.tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
            scores = (embeddings[ids] @ weight).tolist()
            tokens = model.tokenizer.convert_ids_to_tokens(ids)
            print(" ".join(f"{t!r}:{s:+.2f}" for t, s in zip(tokens, scores)))


if __name__ == "__main__":
    main()
