"""KMergeModel: a frozen causal LM + PEFT LoRA + a merge encoder.

The prompt goes in as ceil(L/K) merged embeddings; answers and generated tokens stay ordinary
tokens of the base vocabulary. ``save_pretrained`` / ``from_pretrained`` mirror peft's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from kmerge.batching import (
    IGNORE_INDEX,
    BlockAlignment,
    CompressedBatch,
    compress_batch,
    prompt_layout,
    tokenize_answers,
    tokenize_prompts,
)
from kmerge.encoder import MergeEncoder, check_k
from kmerge.errors import KMergeConfigError
from kmerge.io import atomic_directory
from kmerge.models import DEFAULT_MODEL, check_causal_lm, lm_logits, load_base_model
from kmerge.options import check_values, from_known_keys, option

if TYPE_CHECKING:
    from kmerge.methods import PromptCompressor

CONFIG_FILE = "kmerge_config.json"
ENCODER_FILE = "encoder.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class KMergeConfig:
    """Everything needed to rebuild a KMergeModel around its base model."""

    k: int = option(4, "block size K: tokens merged into one position (1 = uncompressed)")
    base_model: str = option(DEFAULT_MODEL, "embedded name, hub id or local dir")
    lora_r: int = option(8, "LoRA rank", minimum=1)
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: str | list[str] = option(
        "all-linear", 'LoRA target modules: "all-linear" or comma-separated module names'
    )
    encoder_hidden_size: int | None = option(
        None, "encoder MLP width (default: the base model's hidden size)"
    )
    encoder_layers: int = option(2, "encoder MLP layers")
    encoder_input_norm: bool = option(
        False, "LayerNorm the concatenated block before the encoder MLP"
    )
    encoder_context: int = option(
        0, "neighbouring blocks on each side whose mean the encoder MLP also reads", minimum=0
    )
    prepend_bos: bool = option(False, "one unmerged BOS position before the merged prompt")
    block_alignment: BlockAlignment = option(
        "start",
        "how prompts are cut into blocks: from the start, so the last block is partial; from "
        "the end; or segments (a block never spans a segment_chars boundary)",
    )
    segment_chars: str = option(
        "\n,",
        "with segments: characters whose token starts a new block",
        requires="block_alignment=segments",
    )
    # An augmentation against memorising merged vectors: a prompt seen again in a later epoch is
    # cut differently, so what stays the same is its tokens, not its blocks.
    block_jitter: float = option(
        0.0,
        "training only: each prompt token also starts a new block with this probability, so "
        "repeated prompts are merged differently each time (evaluation is unchanged)",
        requires="block_alignment=segments",
        minimum=0.0,
        maximum=1.0,
    )
    # The same aim by content: a prompt seen again loses other tokens, so its merged vectors
    # differ each time, and the shorter prompts make a step cheaper instead of dearer.
    token_dropout: float = option(
        0.0,
        "training only: each prompt token that is not protected is left out with this "
        "probability before merging (evaluation is unchanged)",
    )
    answer_separator: str = option(
        " ", "put between prompt and answer (the answer is tokenised alone)"
    )
    append_eos: bool = option(True, "end each training answer with EOS")
    # A token-level prompt compressor of kmerge.methods (e.g. "random_drop"), applied to the
    # prompt ids before merging; None = the whole prompt.
    prompt_compressor: str | None = option(
        None, "token-level compressor applied before merging (e.g. random_drop)"
    )
    compression_ratio: float | None = option(
        None, "the prompt compressor's target ratio", requires="prompt_compressor"
    )
    compressor_seed: int = option(0, "the prompt compressor's seed", requires="prompt_compressor")
    freeze_encoder: bool = option(False, "keep the encoder at its init, the exact block mean")
    merge_norm: Literal["mean", "token", "centered"] = option(
        "mean",
        "mean: the paper's average init; token: rescale each block mean to its tokens' mean "
        "norm; centered: scale its deviation from the embedding table's mean by sqrt(tokens) "
        "(the MLP correction comes on top)",
    )
    merge_pooling: Literal["mean", "attention"] = option(
        "mean",
        "mean: every real token of a block weighs the same; attention: learned weights "
        "(softmax of a score of each token, starting uniform, so still the mean at step 0)",
    )
    # Protected spans: prompt tokens fed as ordinary tokens, never merged. Both count as
    # positions fed in the measured compression.
    protect_pattern: str | None = option(
        None,
        "regular expression; its matches stay ordinary tokens (tasks offer their question as "
        "query_pattern: --protect-query)",
    )
    protect_last: int = option(0, "the last N prompt tokens stay ordinary tokens", minimum=0)
    # Hybrid compression (HyCo2-like): only the runs between the surprising tokens are merged.
    protect_surprising: float = option(
        0.0, "share of each prompt's tokens, the most surprising to the base model, kept raw"
    )
    spread_positions: bool = option(
        False,
        "merged positions take their block's last token's position id (arXiv 2409.14364): "
        "the answer sits where it would after the plain prompt",
    )
    base_fingerprint: dict = option(cli=False, default_factory=dict)  # filled in by from_base

    def __post_init__(self) -> None:
        check_k(self.k)
        if isinstance(self.lora_target_modules, str) and "," in self.lora_target_modules:
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",")]
        if isinstance(self.protect_last, bool) or not isinstance(self.protect_last, int):
            raise KMergeConfigError(
                f"protect_last must be an integer >= 0, got {self.protect_last!r}"
            )
        check_values(self)
        if self.protect_pattern is not None:
            try:
                re.compile(self.protect_pattern)
            except re.error as err:
                raise KMergeConfigError(
                    f"protect_pattern {self.protect_pattern!r} is not a regular expression: {err}"
                ) from None
        if not 0.0 <= self.protect_surprising < 1.0:
            raise KMergeConfigError(
                f"protect_surprising is a share in [0, 1), got {self.protect_surprising}"
            )
        if not 0.0 <= self.token_dropout < 1.0:
            raise KMergeConfigError(
                f"token_dropout is a probability in [0, 1), got {self.token_dropout}"
            )
        if self.block_jitter and self.block_alignment != "segments":
            raise KMergeConfigError(
                "block_jitter adds segment starts: it needs block_alignment='segments', got "
                f"{self.block_alignment!r}"
            )
        protects = self.protect_pattern or self.protect_last or self.protect_surprising
        if self.prompt_compressor and protects:
            raise KMergeConfigError(
                "protected spans and a token-level prompt_compressor cannot be combined"
            )
        if self.prompt_compressor is not None:
            # Imported here: the compressors use the model (modeling must not need them to load).
            from kmerge.methods import check_compressor

            check_compressor(self.prompt_compressor, self.compression_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KMergeConfig:
        return from_known_keys(cls, data, "kmerge config")


@dataclass
class KMergeOutput:
    loss: torch.Tensor  # mean over all answer tokens of the batch
    example_losses: torch.Tensor  # [B] mean over each example's answer tokens
    answer_tokens: torch.Tensor  # [B] number of answer tokens (incl. EOS) per example
    token_losses: torch.Tensor  # [n answer tokens] each one's cross-entropy, in batch order

    def focal_loss(self, gamma: float) -> torch.Tensor:
        """Mean over answer tokens of (1 - p)^gamma * cross-entropy, p the probability of the
        right token (focal loss, arXiv 1708.02002): tokens the model already predicts
        confidently weigh less, so the gradient goes to the examples it still gets wrong.
        ``gamma`` 0 is :attr:`loss`."""
        if gamma == 0:
            return self.loss
        weight = (-torch.expm1(-self.token_losses)).clamp(min=0).pow(gamma)  # (1 - p)^gamma
        return (weight * self.token_losses).mean()


@dataclass
class AnswerStates:
    """What the model computes at the positions that predict answer tokens (for distillation)."""

    output: KMergeOutput
    logits: torch.Tensor  # [n answer tokens, vocab]
    hidden: list[torch.Tensor] | None  # per decoder layer: [n answer tokens, H]
    # per decoder layer: [n chosen prompt positions, H] (answer_states' prompt_positions)
    prompt_hidden: list[torch.Tensor] | None = None


def base_fingerprint(model: PreTrainedModel) -> dict:
    """A cheap identity for a base model: shapes plus a hash of part of its embedding table."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach()
    sample = emb[: min(64, emb.shape[0])].float().cpu().contiguous()
    return {
        "model_type": getattr(cfg, "model_type", "?"),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "num_hidden_layers": int(getattr(cfg, "num_hidden_layers", -1)),
        "embedding_sha1": hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:16],
    }


class KMergeModel(nn.Module):
    """Base causal LM with LoRA adapters, fed K-merged prompts."""

    def __init__(
        self, peft_model: PeftModel, encoder: MergeEncoder, tokenizer, config: KMergeConfig
    ):
        super().__init__()
        self.peft_model = peft_model
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.config = config
        self.compressor = _make_compressor(config)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_base(
        cls, base: str | PreTrainedModel, config: KMergeConfig | None = None, tokenizer=None
    ) -> KMergeModel:
        """Wrap a base model (name, path or loaded model) with fresh LoRA and encoder."""
        config = dataclasses.replace(config) if config else KMergeConfig()
        if isinstance(base, str):
            config.base_model = base
            base, tokenizer = load_base_model(base)
        elif tokenizer is None:
            raise KMergeConfigError("from_base with a model object also needs its tokenizer")
        else:
            # Record where the model came from so from_pretrained(dir) can find it again.
            config.base_model = getattr(base, "name_or_path", "") or ""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        check_causal_lm(base)
        for p in base.parameters():
            p.requires_grad_(False)
        config.base_fingerprint = base_fingerprint(base)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, lora)
        encoder = cls.make_encoder(base, config).requires_grad_(not config.freeze_encoder)
        return cls(peft_model, encoder, tokenizer, config)

    @staticmethod
    def make_encoder(base: PreTrainedModel, config: KMergeConfig) -> MergeEncoder:
        """A fresh encoder (average init) for ``config``, sized and placed like ``base``'s
        input embeddings."""
        emb = base.get_input_embeddings().weight
        return MergeEncoder(
            emb.shape[1],
            config.k,
            config.encoder_hidden_size,
            config.encoder_layers,
            config.encoder_input_norm,
            config.merge_norm == "token",
            config.merge_pooling == "attention",
            emb.detach().float().mean(dim=0) if config.merge_norm == "centered" else None,
            config.encoder_context,
        ).to(device=emb.device, dtype=emb.dtype)

    # ---------------------------------------------------------------- properties
    @property
    def k(self) -> int:
        return self.config.k

    @property
    def lm(self) -> PreTrainedModel:
        """The base causal LM (with LoRA layers injected)."""
        return self.peft_model.get_base_model()

    @property
    def max_positions(self) -> int | None:
        return getattr(self.lm.config, "max_position_embeddings", None)

    @property
    def _no_split_modules(self) -> list[str]:
        """The base model's layer classes: what FSDP's transformer auto-wrap shards one by one
        (accelerate reads this attribute from the model it wraps, here a KMergeModel)."""
        return list(getattr(self.lm, "_no_split_modules", None) or [])

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    # ---------------------------------------------------------------- batching
    def prepare(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
        reserve: int = 0,
        *,
        k: int | None = None,
        protect: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> CompressedBatch:
        """Tokenise, embed and merge prompts; append answers as ordinary tokens.

        ``k``: merge at this block size instead of the config's (1 <= k <= config.k; the
        encoder merges smaller blocks as partial ones). ``protect``: per prompt, character
        spans ``(start, end)`` to keep as ordinary tokens, on top of the config's."""
        k = self.resolve_k(k)
        prompt_ids, protected, segment_starts, prompt_tokens = self._tokens(prompts, protect)
        answer_ids = None
        if answers is not None:  # compress_batch checks that the counts agree
            answer_ids = tokenize_answers(
                self.tokenizer, answers, self.config.answer_separator, self.config.append_eos
            )
        return compress_batch(
            self.lm.get_input_embeddings(),
            self.encoder,
            prompt_ids,
            answer_ids,
            pad_id=self.tokenizer.pad_token_id,
            align=self.config.block_alignment,
            max_positions=self.max_positions,
            reserve=reserve,
            prefix_ids=self._prefix_ids(),
            segment_starts=segment_starts,
            prompt_tokens=prompt_tokens,
            protected=protected,
            k=k,
            spread_positions=self.config.spread_positions,
        )

    def prompt_layouts(
        self,
        prompts: Sequence[str],
        *,
        k: int | None = None,
        protect: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> list[list[tuple[int, int, bool]]]:
        """Per prompt, the ``(start, end, raw)`` token spans that :meth:`prepare` makes of it
        (block alignment, protected spans; the BOS prefix not counted): for diagnostics that
        need to know which tokens share a merged position."""
        k = self.resolve_k(k)
        prompt_ids, protected, starts, _ = self._tokens(prompts, protect)
        return [
            prompt_layout(len(ids), k, self.config.block_alignment,
                          starts[i] if starts else (), protected[i] if protected else ())
            for i, ids in enumerate(prompt_ids)
        ]  # fmt: skip

    def _tokens(self, prompts: Sequence[str], protect) -> tuple:
        """The prompts' token ids (after any prompt_compressor), protected flags, segment-start
        flags and token counts before compression: what block layouts are made from."""
        prompt_ids = tokenize_prompts(self.tokenizer, prompts)
        protected = self.protected_flags(prompts, prompt_ids, protect)
        prompt_tokens = [len(ids) for ids in prompt_ids]  # measured before any compression
        if self.compressor is not None:
            prompt_ids = self.compressor.compress(prompt_ids, self)
        if self.training and self.config.token_dropout:
            prompt_ids, protected = self._drop_tokens(prompt_ids, protected)
        starts = self._segment_starts(prompt_ids)
        if self.training and self.config.block_jitter and starts is not None:
            # torch's global RNG: seeded by the run and saved in its checkpoints (exact resume).
            p = self.config.block_jitter
            starts = [
                [cut or extra for cut, extra in zip(row, (torch.rand(len(row)) < p).tolist())]
                for row in starts
            ]
        return prompt_ids, protected, starts, prompt_tokens

    def _drop_tokens(
        self, prompt_ids: list[list[int]], protected: list[list[bool]] | None
    ) -> tuple[list[list[int]], list[list[bool]] | None]:
        """token_dropout: each unprotected token is left out with probability p (torch's global
        RNG, like block_jitter); a prompt keeps its last token when every other one is drawn."""
        p = self.config.token_dropout
        kept_ids, kept_flags = [], []
        for i, ids in enumerate(prompt_ids):
            flags = protected[i] if protected else [False] * len(ids)
            keep = [raw or draw for raw, draw in zip(flags, (torch.rand(len(ids)) >= p).tolist())]
            if ids and not any(keep):
                keep[-1] = True
            kept_ids.append([t for t, k in zip(ids, keep) if k])
            kept_flags.append([f for f, k in zip(flags, keep) if k])
        return kept_ids, kept_flags if protected else None

    def resolve_k(self, k: int | None) -> int:
        """The block size to merge at: ``k`` checked against the encoder (None: the config's)."""
        if k is None:
            return self.config.k
        check_k(k)
        if k > self.config.k:
            raise KMergeConfigError(
                f"K={k} is larger than the K={self.config.k} this model's encoder was built for"
            )
        return k

    def protected_flags(
        self,
        prompts: Sequence[str],
        prompt_ids: list[list[int]],
        spans: Sequence[Sequence[tuple[int, int]]] | None,
    ) -> list[list[bool]] | None:
        """Per prompt token: True when it stays an ordinary token (see KMergeConfig)."""
        pattern, last = self.config.protect_pattern, self.config.protect_last
        share = self.config.protect_surprising
        if not (pattern or last or spans or share):
            return None
        if spans is not None and len(spans) != len(prompts):
            raise KMergeConfigError(f"{len(prompts)} prompts but {len(spans)} protect span lists")
        if self.compressor is not None:
            raise KMergeConfigError("protected spans cannot be combined with a prompt_compressor")
        flags = []
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
            chars = list(spans[i]) if spans is not None else []
            if pattern:
                chars += [m.span() for m in re.finditer(pattern, prompt)]
            row = [False] * len(ids)
            if chars:
                enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
                if enc["input_ids"] != ids:
                    raise KMergeConfigError("protected spans need a fast tokenizer (offsets)")
                for t, (a, b) in enumerate(enc["offset_mapping"]):
                    row[t] = any(a < e and s < max(b, a + 1) for s, e in chars if e > s)
            for t in range(max(0, len(ids) - last), len(ids)):
                row[t] = True
            flags.append(row)
        if share:
            for row, ids, scores in zip(flags, prompt_ids, self._surprisal(prompt_ids)):
                keep = math.ceil(share * len(ids))
                for t in sorted(range(len(ids)), key=lambda t: (-scores[t], t))[:keep]:
                    row[t] = True
        return flags

    def _surprisal(self, prompt_ids: list[list[int]]) -> list[list[float]]:
        """Each token's surprisal under the frozen base model (adapters off), cached per
        prompt: the scores never change during training."""
        from kmerge.methods.self_information import SelfInformation

        if not hasattr(self, "_surprisal_scorer"):
            self._surprisal_scorer = SelfInformation(ratio=2.0)
        return self._surprisal_scorer.scores(prompt_ids, self)

    def _segment_starts(self, prompt_ids: list[list[int]]) -> list[list[bool]] | None:
        if self.config.block_alignment != "segments":
            return None
        if not hasattr(self, "_segment_table"):
            # A token starts a segment when its text begins with one of segment_chars.
            chars = tuple(self.config.segment_chars)
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._segment_table = [
                self.tokenizer.convert_tokens_to_string([t]).lstrip(" ").startswith(chars)
                if t is not None
                else False
                for t in vocab
            ]
        return [[self._segment_table[t] for t in ids] for ids in prompt_ids]

    def _prefix_ids(self) -> list[int]:
        if not self.config.prepend_bos:
            return []
        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise KMergeConfigError("prepend_bos=True but the tokenizer has no BOS token")
        return [bos]

    # ---------------------------------------------------------------- training / scoring
    def forward(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        k: int | None = None,
        protect: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> KMergeOutput:
        """Loss over answer tokens only (prompt positions never get logits)."""
        return self.loss(self.prepare(prompts, answers, k=k, protect=protect))

    def loss(self, batch: CompressedBatch) -> KMergeOutput:
        return self.answer_states(batch).output

    def answer_states(
        self,
        batch: CompressedBatch,
        layers: bool = False,
        prompt_positions: Sequence[Sequence[int]] | None = None,
    ) -> AnswerStates:
        """Logits (and with ``layers`` every decoder layer's hidden state) at the positions
        that predict answer tokens, in batch order, with the loss over them.
        ``prompt_positions``: per example, fed prompt positions (0 = the first after any
        prefix) whose hidden states at every decoder layer to return too, in that order."""
        if batch.labels is None:
            raise KMergeConfigError("loss needs answers: the batch has no labels")
        out = self.lm.get_decoder()(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            output_hidden_states=layers or prompt_positions is not None,
        )
        # Position t predicts token t + 1: apply the LM head only where t + 1 is an answer token
        # (with whatever scaling or soft-capping the base model's forward puts after its head).
        targets = batch.labels[:, 1:]
        where = targets != IGNORE_INDEX
        logits = lm_logits(self.lm, out.last_hidden_state[:, :-1][where])
        token_losses = F.cross_entropy(logits.float(), targets[where], reduction="none")
        rows = where.nonzero()[:, 0]
        counts = where.sum(dim=1)
        per_example = torch.zeros(len(counts), device=token_losses.device).index_add(
            0, rows, token_losses
        ) / counts.clamp(min=1)
        hidden = [h[:, :-1][where] for h in out.hidden_states[1:]] if layers else None
        prompt_hidden = None
        if prompt_positions is not None:
            rows, cols = batch.prompt_columns(prompt_positions)
            prompt_hidden = [h[rows, cols] for h in out.hidden_states[1:]]
        output = KMergeOutput(token_losses.mean(), per_example, counts, token_losses)
        return AnswerStates(output, logits, hidden, prompt_hidden)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 16,
        k: int | None = None,
        **generation_kwargs,
    ) -> list[str]:
        """Generate continuations of merged prompts (batched, KV-cached) and decode them.

        ``k`` merges at another block size than the config's (see :meth:`prepare`). Extra
        keyword arguments go to transformers' ``generate`` (``do_sample``, ``temperature``,
        ``top_p``, ...). Greedy unless told otherwise.
        """
        ids = self.generate_ids(prompts, max_new_tokens, k=k, **generation_kwargs)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[str] | CompressedBatch,
        max_new_tokens: int = 16,
        k: int | None = None,
        **generation_kwargs,
    ) -> list[list[int]]:
        """Like :meth:`generate` but returns the new token ids, cut before the first EOS.
        ``prompts`` may also be a batch from :meth:`prepare` (made with ``reserve``)."""
        batch = (
            prompts
            if isinstance(prompts, CompressedBatch)
            else self.prepare(prompts, reserve=max_new_tokens, k=k)
        )
        was_training = self.training
        self.eval()
        eos = self.tokenizer.eos_token_id
        generation_kwargs.setdefault("do_sample", False)
        try:
            out = self.peft_model.generate(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos,
                **generation_kwargs,
            )
        finally:
            self.train(was_training)
        return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> Path:
        """Write adapter, encoder (safetensors) and kmerge config; atomic (``atomic_directory``).

        ``state_dict``: this model's full state dict (keys as in ``self.state_dict()``), for
        when its own parameters are shards (FSDP): ``accelerator.get_state_dict`` gathers it."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        adapter = _with_prefix(state_dict, "peft_model.")
        encoder = _with_prefix(state_dict, "encoder.")
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            # Embeddings are never trained (they feed the encoder); saying so also stops peft
            # from looking the base model up on the hub.
            self.peft_model.save_pretrained(tmp, save_embedding_layers=False, state_dict=adapter)
            encoder = {k: v.detach().cpu().contiguous() for k, v in encoder.items()}
            save_file(encoder, tmp / ENCODER_FILE, metadata={"k": str(self.k)})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        base: str | PreTrainedModel | None = None,
        tokenizer=None,
        is_trainable: bool = False,
    ) -> KMergeModel:
        """Rebuild a saved model. ``base`` defaults to the base model named in the config; a
        different base model (by fingerprint) or a K that disagrees with the encoder is refused."""
        directory = Path(directory)
        if not directory.is_dir():
            raise KMergeConfigError(f"checkpoint {directory} does not exist or is not a directory")
        missing = [
            f for f in (CONFIG_FILE, ENCODER_FILE, *ADAPTER_FILES) if not (directory / f).is_file()
        ]
        if missing:
            raise KMergeConfigError(f"checkpoint {directory} is missing {', '.join(missing)}")
        # Every file is read and checked before the base model loads: a damaged checkpoint
        # fails at once, naming the file.
        saved_config = _read_json(directory / CONFIG_FILE)
        if not isinstance(saved_config, dict):
            raise KMergeConfigError(f"{directory / CONFIG_FILE} does not hold a JSON object")
        config = KMergeConfig.from_dict(saved_config)
        _read_json(directory / ADAPTER_FILES[0])
        read_safetensors(directory / ADAPTER_FILES[1], tensors=False)
        encoder_meta, encoder_state = read_safetensors(directory / ENCODER_FILE)
        if base is None:
            if not config.base_model:
                raise KMergeConfigError(
                    f"checkpoint {directory} was trained on an in-memory base model with no "
                    "name; pass it with from_pretrained(directory, base=model, tokenizer=tok)"
                )
            base = config.base_model
        if isinstance(base, str):
            base, loaded_tok = load_base_model(base)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise KMergeConfigError("from_pretrained with a model object also needs its tokenizer")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        check_causal_lm(base)
        found = base_fingerprint(base)
        if config.base_fingerprint and found != config.base_fingerprint:
            diff = {
                k: (v, found.get(k))
                for k, v in config.base_fingerprint.items()
                if found.get(k) != v
            }
            raise KMergeConfigError(
                f"checkpoint {directory} was trained on a different base model "
                f"({config.base_model!r}); mismatch (saved, given): {diff}"
            )
        saved_k = encoder_meta.get("k")
        if saved_k is not None and int(saved_k) != config.k:
            raise KMergeConfigError(
                f"checkpoint {directory}: the config says K={config.k} but the saved encoder "
                f"was trained with K={saved_k}"
            )
        encoder = cls.make_encoder(base, config)
        expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in encoder_state.items()}
        if expected != saved:
            raise KMergeConfigError(
                f"checkpoint {directory}: the saved encoder does not match its config "
                f"(K={config.k}, "
                f"encoder_layers={config.encoder_layers}, encoder_hidden_size="
                f"{config.encoder_hidden_size}, encoder_input_norm={config.encoder_input_norm}, "
                f"merge_pooling={config.merge_pooling}, "
                f"encoder_context={config.encoder_context}): "
                f"expected tensors {expected}, found {saved}"
            )
        encoder.load_state_dict(encoder_state)
        for p in base.parameters():
            p.requires_grad_(False)
        try:
            peft_model = PeftModel.from_pretrained(base, directory, is_trainable=is_trainable)
        except (RuntimeError, ValueError, KeyError, OSError) as err:  # e.g. other shapes
            raise KMergeConfigError(
                f"checkpoint {directory}: cannot load its LoRA adapter: {_first_line(err)}"
            ) from None
        model = cls(peft_model, encoder, tokenizer, config)
        encoder.requires_grad_(is_trainable and not config.freeze_encoder)
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- inference speed
    def merge_lora(self) -> KMergeModel:
        """Fold the LoRA update into the base weights (W += scale * B @ A) for inference.

        Outputs stay the same up to float rounding, but every adapted linear layer runs one
        matmul instead of three: on a CPU that is most of the gap to the raw model's speed
        (docs/performance.md). Training a merged model is refused (its LoRA weights would get
        no gradient); :meth:`unmerge_lora` undoes it. ``save_pretrained`` is unaffected."""
        if not self.lora_merged:
            self.peft_model.merge_adapter()
        return self

    def unmerge_lora(self) -> KMergeModel:
        """Subtract the LoRA update from the base weights again (see :meth:`merge_lora`)."""
        if self.lora_merged:
            self.peft_model.unmerge_adapter()
        return self

    @property
    def lora_merged(self) -> bool:
        return any(getattr(m, "merged", False) for m in self.peft_model.modules())


def _make_compressor(config: KMergeConfig) -> PromptCompressor | None:
    """The token-level prompt compressor the config names (None: the whole prompt)."""
    if config.prompt_compressor is None:
        return None
    from kmerge.methods import get_compressor  # not at the top: the compressors use the model

    cfg = config
    return get_compressor(cfg.prompt_compressor, cfg.compression_ratio, cfg.compressor_seed)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_json(path: Path):
    """The JSON value in ``path``; a file that is not JSON is a one-line error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise KMergeConfigError(f"{path} is not valid JSON ({_first_line(err)})") from None


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    """The metadata and (with ``tensors``) the tensors of a safetensors file; a truncated or
    foreign file (e.g. a pickle) is a one-line error naming it."""
    try:
        with safe_open(path, "pt") as f:  # checks the header covers the whole file
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise KMergeConfigError(
            f"{path} is not a readable safetensors file (truncated or another format?): "
            f"{_first_line(err)}"
        ) from None
    return metadata, state


def _with_prefix(state_dict: dict, prefix: str) -> dict:
    """The entries of ``state_dict`` under ``prefix``, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
