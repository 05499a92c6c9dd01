"""The merge encoder: K token embeddings in, one embedding out.

``output = masked_mean(block) + MLP(concat(block))``. The MLP's last layer starts at zero, so at
initialisation the encoder is exactly the mean of each block's real tokens ("average init")
and training learns a correction on top. The MLP reads the block as a concatenation, which,
unlike the mean, knows the order of the tokens inside the block. With attention pooling the
mean is a learned weighted one, which also starts uniform. With ``context`` C the MLP also
reads the plain means of the C blocks on either side, so a block's correction can depend on
its neighbours (a negation just before it, the line it continues).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kmerge.errors import KMergeConfigError


def check_k(k: object) -> int:
    """Validate a block size K: an integer >= 1 (bools are rejected)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise KMergeConfigError(f"K must be an integer >= 1, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise KMergeConfigError(f"K must be an integer >= 1, got {k}")
    return k


class MergeEncoder(nn.Module):
    """Merge blocks ``[B, N, K, H]`` (with mask ``[B, N, K]``) into ``[B, N, H]``.

    Args:
        hidden_size: the base model's embedding width H.
        k: block size K. K = 1 is the identity and has no parameters.
        mlp_hidden_size: width of the residual MLP's hidden layer (default H).
        num_layers: number of linear layers in the residual MLP (>= 1).
        input_norm: LayerNorm the concatenated block before the MLP. Token embeddings are small
            (norm ~3 over hundreds of dims), so without it the MLP's hidden units start near
            zero and the residual branch learns slowly.
        token_norm: rescale the block mean to the mean norm of the block's tokens. A mean of
            K embeddings keeps only part of a token's norm (0.64-0.77 at K=4 on SmolLM2), so it
            looks like no token the model has seen; the direction is unchanged.
        center: with a vector c (the mean of the embedding table), ``c + sqrt(n) (mean - c)`` for
            a block of n real tokens. A mean of n unrelated tokens keeps their shared direction
            c and shrinks what tells them apart by about sqrt(n); this scales that part back to
            a single token's size (a one-token block is unchanged).
        attention_pooling: replace the plain mean by a weighted one, each token's weight a
            softmax over the block of a learned score of its embedding. The score starts at
            zero, so the weights start uniform and the encoder still starts as the mean; trained,
            it can let a block's content tokens outweigh its newlines and punctuation.
        context: how many neighbouring blocks on each side the MLP reads, each as its plain
            mean (zeros past either end of the prompt and for padded blocks, so a batch and
            each example alone see the same neighbours). 0 reads the block alone (the paper).
    """

    def __init__(
        self,
        hidden_size: int,
        k: int,
        mlp_hidden_size: int | None = None,
        num_layers: int = 2,
        input_norm: bool = False,
        token_norm: bool = False,
        attention_pooling: bool = False,
        center: torch.Tensor | None = None,
        context: int = 0,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.token_norm = token_norm
        if token_norm and center is not None:
            raise KMergeConfigError("token_norm and center are two different rescalings: one")
        # Not saved: rebuilt from the base model's embedding table, like the base weights.
        self.register_buffer("center", center, persistent=False)
        self.k = check_k(k)
        if num_layers < 1:
            raise KMergeConfigError(f"encoder num_layers must be >= 1, got {num_layers}")
        if isinstance(context, bool) or not isinstance(context, int) or context < 0:
            raise KMergeConfigError(f"encoder context must be an integer >= 0, got {context!r}")
        self.context = context
        self.mlp: nn.Sequential | None = None
        self.pool_score: nn.Linear | None = None
        if self.k > 1 and attention_pooling:
            self.pool_score = nn.Linear(hidden_size, 1, bias=False)  # softmax ignores a bias
        if self.k > 1:
            width = mlp_hidden_size or hidden_size
            mlp_in = (self.k + 2 * context) * hidden_size
            dims = [mlp_in] + [width] * (num_layers - 1) + [hidden_size]
            layers: list[nn.Module] = [nn.LayerNorm(mlp_in)] if input_norm else []
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
                layers.append(nn.Linear(d_in, d_out))
                if i < num_layers - 1:
                    layers.append(nn.GELU())
            self.mlp = nn.Sequential(*layers)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Average init: zero the residual branch's output layer (and the pooling score) so the
        encoder is the mean."""
        if self.mlp is not None:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        if self.pool_score is not None:
            nn.init.zeros_(self.pool_score.weight)

    def forward(self, blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if blocks.dim() != 4 or blocks.shape[2] != self.k or blocks.shape[3] != self.hidden_size:
            raise KMergeConfigError(
                f"MergeEncoder(k={self.k}, hidden={self.hidden_size}) expects blocks "
                f"[B, N, {self.k}, {self.hidden_size}], got {list(blocks.shape)}"
            )
        mask = mask.to(blocks.dtype).unsqueeze(-1)  # [B, N, K, 1]
        blocks = blocks * mask  # padding slots become exact zeros, whatever was there
        count = mask.sum(dim=2)  # [B, N, 1]
        mean = blocks.sum(dim=2) / count.clamp(min=1.0)  # padded blocks: zeros
        if self.pool_score is None:
            merged = mean
        else:  # padding slots get the lowest score: weight 0 (uniform, of zeros, when all are)
            scores = self.pool_score(blocks)  # under autocast its dtype may not be blocks'
            scores = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min)
            merged = (scores.softmax(dim=2) * blocks).sum(dim=2)
        if self.token_norm:
            token_norms = blocks.norm(dim=-1, keepdim=True).sum(dim=2) / count.clamp(min=1.0)
            merged = merged * (token_norms / merged.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        if self.center is not None:
            merged = self.center + (merged - self.center) * count.clamp(min=1.0).sqrt()
        if self.mlp is not None:
            merged = merged + self.mlp(self._mlp_input(blocks, mean))
        # A block with no real token is padding: make it exactly zero (it is masked anyway).
        return merged * (count > 0).to(blocks.dtype)

    def _mlp_input(self, blocks: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """The block's tokens, concatenated, then the plain means ``[B, N, H]`` of its C
        neighbours on each side (nearest first; zeros where there is no real block)."""
        flat = blocks.flatten(2)  # [B, N, K*H]
        if not self.context:
            return flat
        n = means.shape[1]
        neighbours = []
        for d in range(1, self.context + 1):
            neighbours.append(F.pad(means, (0, 0, d, 0))[:, :n])  # block i - d
            neighbours.append(F.pad(means, (0, 0, 0, d))[:, d:])  # block i + d
        return torch.cat([flat, *neighbours], dim=-1)
