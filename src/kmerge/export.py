"""``kmerge export CHECKPOINT OUT``: the checkpoint as a plain Hugging Face model folder.

The LoRA update is folded into the base weights (peft's ``merge_and_unload``), so OUT loads
with ``AutoModelForCausalLM.from_pretrained(OUT)`` alone and gives the logits of the merged
kmerge model for the same ``inputs_embeds``; any server that takes prompt embeddings (vLLM
with ``--enable-prompt-embeds``) can serve it. The merge encoder and kmerge's config go beside
it in ``OUT/kmerge/`` (``encoder.safetensors``, ``kmerge_config.json``): prompts must still be
merged by kmerge (``kmerge serve --backend vllm``) before the model sees them. A subfolder,
because vLLM loads every ``*.safetensors`` file at the top of a model folder as weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from kmerge.errors import KMergeConfigError

EXPORT_INFO = "kmerge_export.json"
KMERGE_SUBDIR = "kmerge"


def export(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the folded model, tokenizer, encoder and kmerge config to ``out`` (atomically)."""
    from safetensors.torch import save_file

    from kmerge.modeling import CONFIG_FILE, ENCODER_FILE, KMergeModel

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise KMergeConfigError(f"{out} already exists and is not empty (--overwrite replaces it)")
    model = KMergeModel.from_pretrained(checkpoint)
    encoder = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    lm = model.peft_model.merge_and_unload()  # W += scale * B @ A, LoRA layers removed
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        lm.save_pretrained(tmp, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)
        extra = tmp / KMERGE_SUBDIR
        extra.mkdir()
        save_file(encoder, extra / ENCODER_FILE, metadata={"k": str(model.k)})
        (extra / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        info = {
            "checkpoint": str(Path(checkpoint).resolve()),
            "k": model.k,
            "lora": "folded into the base weights",
        }
        (extra / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="kmerge checkpoint directory")
    parser.add_argument("out", help="folder to write (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> None:
    out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    print(
        f"wrote {out} (AutoModelForCausalLM.from_pretrained loads it; prompts are merged "
        f"by {KMERGE_SUBDIR}/encoder.safetensors)"
    )
