"""Does the frozen language model read merged prompts? Linear probes on its hidden states.

    .venv/bin/python benchmarks/frozen_probe.py --task amazon_reviews \
        --data-dir ../shared/data/amazon_reviews --max-prompt-tokens 96

For each prompt the base model (no adapters, the encoder at its average init, or a trained
checkpoint's LoRA and encoder with ``--checkpoint``) reads it twice: plain (K=1) and merged
(K). At chosen decoder layers, two features per prompt: the hidden state at the last prompt
position (the one that predicts the answer) and the mean over all prompt positions. A ridge
classifier (closed form, balanced class weights) fitted on training prompts predicts the answer
of held-out ones; the score is macro-F1. Layer 0 is the input embeddings themselves: the mean
over positions there is a bag of embeddings, the same for both K up to block weighting.

What it tells: where the answer's information is lost when prompts are merged. If the mean of
the merged layer-L states predicts the label as well as the plain ones but the last position
does not, the model has the content and does not carry it to the answer; if the mean is
already worse, the layers below L do not read merged vectors the way they read tokens.
"""

from __future__ import annotations

import argparse
import json

import torch

from kmerge.metrics import macro_f1
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.models import load_base_model
from kmerge.training import TrainConfig, load_data


@torch.no_grad()
def features(model: KMergeModel, prompts: list[str], k: int, layers: list[int], batch: int):
    """{(layer, "last" | "mean"): [n, H]} for the prompts merged at ``k``."""
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    for start in range(0, len(prompts), batch):
        fed = model.prepare(prompts[start : start + batch], k=k)
        states = model.lm.get_decoder()(
            inputs_embeds=fed.inputs_embeds,
            attention_mask=fed.attention_mask,
            position_ids=fed.position_ids,
            use_cache=False,
            output_hidden_states=True,
        ).hidden_states
        mask = fed.attention_mask.unsqueeze(-1).float()  # left padding: the last column is real
        for layer in layers:
            h = states[layer].float()
            out.setdefault((layer, "last"), []).append(h[:, -1])
            out.setdefault((layer, "mean"), []).append((h * mask).sum(1) / mask.sum(1))
    return {key: torch.cat(value) for key, value in out.items()}


def ridge_f1(x_tr, y_tr, x_te, y_te, choices: list[str], lam: float = 1e-1) -> float:
    """Macro-F1 of a ridge classifier on standardised features, classes weighted alike."""
    mean, std = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    x1 = torch.cat([x_tr, torch.ones(len(x_tr), 1)], dim=1)
    targets = torch.nn.functional.one_hot(y_tr, len(choices)).float()
    weight = (1.0 / torch.bincount(y_tr, minlength=len(choices)).float())[y_tr].unsqueeze(1)
    gram = x1.T @ (weight * x1) + lam * torch.eye(x1.shape[1]) * weight.sum()
    w = torch.linalg.solve(gram, x1.T @ (weight * targets))
    guess = (torch.cat([x_te, torch.ones(len(x_te), 1)], dim=1) @ w).argmax(1)
    return macro_f1([choices[i] for i in guess], [choices[i] for i in y_te], choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="amazon_reviews")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-prompt-tokens", type=int, default=None)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--block-alignment", default="segments")
    parser.add_argument("--merge-norm", default="mean", choices=["mean", "token", "centered"])
    parser.add_argument("--checkpoint", default=None, help="a kmerge checkpoint instead of base")
    parser.add_argument("--only-merged", action="store_true", help="skip the plain (K=1) pass")
    parser.add_argument("--n-train", type=int, default=768)
    parser.add_argument("--n-test", type=int, default=384)
    parser.add_argument("--layers", default="0,4,8,15,22,30")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    options = {"data_dir": args.data_dir} if args.data_dir else {}
    cfg = TrainConfig(task=args.task, task_options=options, n_train=args.n_train,
                      n_eval=args.n_test, max_prompt_tokens=args.max_prompt_tokens)  # fmt: skip
    if args.checkpoint:
        model = KMergeModel.from_pretrained(args.checkpoint).merge_lora()
    else:
        base, tokenizer = load_base_model(KMergeConfig().base_model)
        config = KMergeConfig(
            k=args.k, block_alignment=args.block_alignment, merge_norm=args.merge_norm
        )
        model = KMergeModel.from_base(base, config, tokenizer=tokenizer)
    model.eval()
    data = load_data(cfg, model.tokenizer)
    choices = sorted({e.answer for e in data.train})
    y_tr = torch.tensor([choices.index(e.answer) for e in data.train])
    y_te = torch.tensor([choices.index(e.answer) for e in data.held_out])
    layers = [int(x) for x in args.layers.split(",")]
    result: dict = {"task": args.task, "k": model.k, "n_train": len(y_tr), "n_test": len(y_te),
                    "checkpoint": args.checkpoint, "merge_norm": model.config.merge_norm,
                    "macro_f1": {}}  # fmt: skip
    for k in (model.k,) if args.only_merged else (1, model.k):
        tr = features(model, [e.prompt for e in data.train], k, layers, args.batch_size)
        te = features(model, [e.prompt for e in data.held_out], k, layers, args.batch_size)
        for layer, where in tr:
            score = ridge_f1(tr[layer, where], y_tr, te[layer, where], y_te, choices)
            result["macro_f1"][f"K={k} layer {layer} {where}"] = round(score, 3)
            print(f"K={k} layer {layer:2d} {where}: macro-F1 {score:.3f}", flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
