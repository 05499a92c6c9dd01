"""What survives merging: linear probes that recover a block's tokens from its merged vector.

    .venv/bin/python benchmarks/merge_probe.py                       # the average init (mean)
    .venv/bin/python benchmarks/merge_probe.py --checkpoint runs/q/k4-s0/checkpoint

For Textualized Tree prompts, every merged block (K tokens -> one vector) is a probe example.
A ridge regression from the merged vector to one-hot token ids (closed form, fitted on blocks
of training prompts, scored on blocks of held-out prompts) is read two ways:
- slot accuracy: the token at slot j of the block is the probe's top guess for slot j
  (a plain mean cannot tell slots apart: this is what order information survives);
- bag recall: of the block's distinct tokens, the share found among the probe's top-n guesses
  of "which tokens are in this block" (what content survives, order aside).
The same probes on single tokens (K=1) give the ceiling. No language model runs: seconds.
"""

from __future__ import annotations

import argparse
import json

import torch

from kmerge.batching import prompt_layout
from kmerge.encoder import MergeEncoder
from kmerge.modeling import KMergeModel
from kmerge.models import load_base_model
from kmerge.tasks.tree import make_tree_examples


def blocks_of(prompts, tokenizer, k, layouts=None):
    """Every merged block of the prompts: ``[M, K]`` token ids and real-token mask. ``layouts``
    lays prompts out as a model does (``KMergeModel.prompt_layouts``); default: the paper's
    contiguous blocks of K."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    spans = layouts(prompts) if layouts else [prompt_layout(len(row), k) for row in ids]
    rows = [row[a:b] for row, layout in zip(ids, spans) for a, b, raw in layout if not raw]
    block_ids = torch.zeros(len(rows), k, dtype=torch.long)
    mask = torch.zeros(len(rows), k, dtype=torch.bool)
    for m, row in enumerate(rows):
        block_ids[m, : len(row)] = torch.tensor(row)
        mask[m, : len(row)] = True
    return block_ids, mask


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> torch.Tensor:
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    gram = x1.T @ x1 + lam * len(x) * torch.eye(x1.shape[1])
    return torch.linalg.solve(gram, x1.T @ y)


def apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1)], dim=1) @ w


@torch.no_grad()
def probe(encoder, embed, train_blocks, test_blocks, k: int) -> dict:
    (tr_ids, tr_mask), (te_ids, te_mask) = train_blocks, test_blocks
    vocab = torch.unique(torch.cat([tr_ids[tr_mask], te_ids[te_mask]]))
    index = {int(t): i for i, t in enumerate(vocab)}

    def onehot(ids, mask):
        out = torch.zeros(len(ids), k, len(vocab))
        for m, j in mask.nonzero().tolist():
            out[m, j, index[int(ids[m, j])]] = 1.0
        return out

    def features(ids, mask):
        return encoder(embed(ids).unsqueeze(0), mask.unsqueeze(0))[0].float()

    x_tr, x_te = features(tr_ids, tr_mask), features(te_ids, te_mask)
    y_tr, y_te = onehot(tr_ids, tr_mask), onehot(te_ids, te_mask)
    slots = []
    for j in range(k):
        rows_tr, rows_te = tr_mask[:, j], te_mask[:, j]
        w = ridge(x_tr[rows_tr], y_tr[rows_tr, j])
        guess = apply(w, x_te[rows_te]).argmax(dim=-1)
        slots.append((guess == y_te[rows_te, j].argmax(dim=-1)).float().mean().item())
    bag_tr, bag_te = y_tr.amax(dim=1), y_te.amax(dim=1)
    scores = apply(ridge(x_tr, bag_tr), x_te)
    found = []
    for s, truth in zip(scores, bag_te):
        n = int(truth.sum())
        top = s.topk(n).indices
        found.append(truth[top].sum().item() / n)
    return {"slot_accuracy": slots, "bag_recall": sum(found) / len(found), "blocks": len(x_te)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a kmerge checkpoint (its encoder)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--stage", default="small")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    layouts = None
    if args.checkpoint:  # its encoder, merging blocks laid out as the checkpoint lays them out
        model = KMergeModel.from_pretrained(args.checkpoint)
        tokenizer, encoder, k = model.tokenizer, model.encoder, model.k
        embed = model.lm.get_input_embeddings()
        layouts = model.prompt_layouts
        label = f"trained encoder of {args.checkpoint}"
    else:
        base, tokenizer = load_base_model("smollm2-135m")
        embed = base.get_input_embeddings()
        k, label = args.k, "mean (average init)"
        encoder = MergeEncoder(embed.weight.shape[1], k)
    hidden = embed.weight.shape[1]
    encoder.eval()
    train = [e.prompt for e in make_tree_examples(args.stage, args.n_train, 0, "train")]
    test = [e.prompt for e in make_tree_examples(args.stage, args.n_test, 0, "test")]
    align = model.config.block_alignment if layouts else "start"
    result = {"encoder": label, "k": k, "block_alignment": align}
    result["merged"] = probe(encoder, embed, blocks_of(train, tokenizer, k, layouts),
                             blocks_of(test, tokenizer, k, layouts), k)  # fmt: skip
    single = MergeEncoder(hidden, 1).eval()
    result["single_tokens"] = probe(single, embed, blocks_of(train, tokenizer, 1),
                                    blocks_of(test, tokenizer, 1), 1)  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
