"""Shared fixtures: the real SmolLM2 tokenizer and tiny, randomly initialised base models.

The tiny models use the real tokenizer's vocabulary (so prompts are real text) but only 32
hidden units and 2 layers, so every test runs in well under a second on one CPU thread.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network: a hub lookup fails at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kmerge.modeling import KMergeConfig, KMergeModel  # noqa: E402

torch.set_num_threads(1)

TOKENIZER_MODEL = "smollm2-135m"


def _cached_tokenizer_dir() -> Path | None:
    """The dequantised-model cache holds tokenizer.json: loading it is much faster than GGUF."""
    roots = []
    if os.environ.get("KMERGE_CACHE"):
        roots.append(Path(os.environ["KMERGE_CACHE"]))
    roots.append(Path.home() / ".cache" / "kmerge")
    for root in roots:
        candidate = root / TOKENIZER_MODEL
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2-135M tokenizer, loaded without the model weights."""
    cached = _cached_tokenizer_dir()
    if cached is not None:
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        from kmerge.models import find_embedded_gguf

        gguf = find_embedded_gguf(TOKENIZER_MODEL)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


#: Tiny base architectures: name -> (config class, causal LM class, what differs from the
#: defaults so that the family's own features matter at 2 layers and short prompts).
TINY_ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # Mistral: sliding-window attention over every layer.
    "mistral": (MistralConfig, MistralForCausalLM, {"head_dim": 8, "sliding_window": 4}),
    # Phi-3: fused qkv / gate_up projections, partial rotary embedding.
    "phi3": (
        Phi3Config,
        Phi3ForCausalLM,
        {"pad_token_id": 0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 256},
    ),
    # Gemma 3 (text only): embeddings scaled by sqrt(hidden) inside the embedding module, tied
    # head, one sliding-window layer (window 4) and one global layer, q/k norms.
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    # Gemma 2: soft-capped LM head (a cap small enough to change tiny logits) and attention.
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 0.5,
            "attn_logit_softcapping": 5.0,
        },
    ),
    # Cohere: logits multiplied by logit_scale; parallel attention/MLP blocks, tied head.
    "cohere": (
        CohereConfig,
        CohereForCausalLM,
        {"logit_scale": 8.0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    ),
    # Granite: logits divided by logits_scaling, embeddings multiplied inside the model.
    "granite": (
        GraniteConfig,
        GraniteForCausalLM,
        {"logits_scaling": 0.125, "embedding_multiplier": 3.0, "residual_multiplier": 0.5},
    ),
    # GPT-2: learned absolute positions, Conv1D projections (no rotary embedding, no GQA).
    "gpt2": (GPT2Config, GPT2LMHeadModel, {"bos_token_id": 0, "eos_token_id": 0}),
}


def tiny_config(vocab_size: int, arch: str = "llama", **overrides):
    """A 2-layer, 32-wide config of the given architecture (a key of ``TINY_ARCHS``)."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    config_cls, _, family = TINY_ARCHS[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    kwargs.update(family)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def build_tiny_base(vocab_size: int, seed: int = 0, arch: str = "llama", **overrides):
    """A randomly initialised tiny causal LM; the same seed gives identical weights."""
    config = tiny_config(vocab_size, arch, **overrides)
    torch.manual_seed(seed)
    return TINY_ARCHS[arch][1](config).eval()


@pytest.fixture
def tiny_base(tokenizer):
    """Factory: ``tiny_base(seed=0, arch="llama", **config_overrides)``."""

    def make(seed: int = 0, arch: str = "llama", **overrides):
        return build_tiny_base(len(tokenizer), seed, arch, **overrides)

    return make


@pytest.fixture
def tiny_model(tiny_base, tokenizer):
    """Factory: ``tiny_model(k, seed=0, arch="llama", base_overrides=None, **kmerge_config)``."""

    def make(k: int, seed: int = 0, arch: str = "llama", base_overrides=None, **cfg):
        base = tiny_base(seed=seed, arch=arch, **(base_overrides or {}))
        model = KMergeModel.from_base(base, KMergeConfig(k=k, **cfg), tokenizer=tokenizer)
        return model.eval()

    return make


def randomise_trainables(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> int:
    """Fill every trainable parameter (LoRA A/B, encoder) with N(0, std) values, so that the
    encoder's residual MLP and the LoRA updates are non-zero. Returns how many were filled."""
    generator = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
                n += 1
    return n


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as a local model directory (a stand-in for a hub model)."""
    path = tmp_path / "tiny-base"
    build_tiny_base(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
