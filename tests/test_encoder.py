"""MergeEncoder: average init, masking, the residual MLP, and K validation."""

import pytest
import torch

from kmerge.encoder import MergeEncoder, check_k
from kmerge.errors import KMergeConfigError

HIDDEN = 8
KS = [1, 2, 3, 4, 8]
# Encoder variants every masking and init property must hold for.
OPTIONS = [
    {},
    {"input_norm": True},
    {"attention_pooling": True},
    {"context": 1},
    {"context": 2, "input_norm": True},
]


def random_blocks(k, batch=3, n=5, seed=0):
    """Random blocks and a random mask with full, partial and completely empty blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(batch, n, k, HIDDEN, generator=g)
    mask = torch.rand(batch, n, k, generator=g) < 0.6
    mask[0, 0] = True  # a full block
    mask[0, 1] = False  # an empty block
    mask[1, 0] = False
    mask[1, 0, 0] = True  # a block with exactly one real token
    return blocks, mask


def masked_mean(blocks, mask):
    """Reference: mean of the real tokens of each block, written the slow obvious way."""
    b, n, _, h = blocks.shape
    out = torch.zeros(b, n, h, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            real = blocks[i, j][mask[i, j]].double()
            if len(real):
                out[i, j] = real.mean(dim=0)
    return out.to(blocks.dtype)


def perturb_mlp(encoder, seed=0, std=0.3):
    """Give every encoder weight (incl. the zero-initialised last layer) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("k", KS)
def test_init_is_masked_mean(k, options):
    """At initialisation the encoder is exactly the mean of each block's real tokens."""
    blocks, mask = random_blocks(k, seed=k)
    encoder = MergeEncoder(HIDDEN, k, **options)
    out = encoder(blocks, mask)
    assert out.shape == (3, 5, HIDDEN)
    torch.testing.assert_close(out, masked_mean(blocks, mask), rtol=1e-6, atol=1e-6)


def test_k1_is_identity_without_parameters():
    """K = 1 passes every real token through unchanged and has nothing to train."""
    encoder = MergeEncoder(HIDDEN, 1)
    assert list(encoder.parameters()) == []
    blocks = torch.randn(2, 7, 1, HIDDEN)
    mask = torch.ones(2, 7, 1, dtype=torch.bool)
    assert torch.equal(encoder(blocks, mask), blocks[:, :, 0])


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("perturbed", [False, True])
def test_empty_blocks_are_zero(k, perturbed, options):
    """A block with no real token comes out as exact zeros, even with a non-zero MLP bias."""
    blocks, mask = random_blocks(k, seed=k)
    encoder = MergeEncoder(HIDDEN, k, **options)
    if perturbed and k > 1:
        perturb_mlp(encoder)
    out = encoder(blocks, mask)
    empty = ~mask.any(dim=2)
    assert empty.any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert (out[~empty].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("perturbed", [False, True])
def test_padding_values_do_not_leak(k, perturbed, options):
    """Whatever sits in masked slots (here huge random numbers) does not change the output."""
    blocks, mask = random_blocks(k, seed=k)
    encoder = MergeEncoder(HIDDEN, k, **options)
    if perturbed and k > 1:
        perturb_mlp(encoder)
    garbage = blocks.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), HIDDEN) * 1e6
    assert not torch.equal(garbage, blocks)
    torch.testing.assert_close(encoder(garbage, mask), encoder(blocks, mask), rtol=0, atol=0)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_residual_mlp_is_used_and_sees_order(k, options):
    """Once trained (perturbed), the output is no longer the mean and depends on token order
    inside a block, which the mean alone cannot see."""
    blocks = torch.randn(2, 3, k, HIDDEN)
    mask = torch.ones(2, 3, k, dtype=torch.bool)
    encoder = MergeEncoder(HIDDEN, k, **options)
    perturb_mlp(encoder)
    out = encoder(blocks, mask)
    mean = masked_mean(blocks, mask)
    assert (out - mean).abs().max() > 1e-2

    reversed_blocks = blocks.flip(dims=[2])
    torch.testing.assert_close(masked_mean(reversed_blocks, mask), mean)
    assert (encoder(reversed_blocks, mask) - out).abs().max() > 1e-2


@pytest.mark.parametrize("options", OPTIONS)
def test_perturbed_encoder_has_gradients_everywhere(options):
    """The residual branch is connected: every encoder parameter gets a gradient."""
    encoder = MergeEncoder(HIDDEN, 4, **options)
    perturb_mlp(encoder)
    blocks, mask = random_blocks(4)
    encoder(blocks, mask).square().sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name  # empty blocks too


@pytest.mark.parametrize("context", [0, 1, 2])
def test_context_reads_exactly_the_neighbours_within_reach(context):
    """With context C a block's output changes when a block at most C away changes, and
    never when one further away does; at C = 0 a block reads only itself."""
    blocks = torch.randn(1, 7, 4, HIDDEN)
    mask = torch.ones(1, 7, 4, dtype=torch.bool)
    encoder = MergeEncoder(HIDDEN, 4, context=context)
    perturb_mlp(encoder)
    out = encoder(blocks, mask)
    changed = blocks.clone()
    changed[0, 3] += torch.randn(4, HIDDEN)
    moved = (encoder(changed, mask) - out).abs().amax(dim=-1)[0]  # per block
    for i in range(7):
        assert (moved[i] > 1e-4) == (abs(i - 3) <= context), (i, moved.tolist())


@pytest.mark.parametrize("context", [1, 2])
def test_context_sees_padding_as_the_prompts_end(context):
    """A prompt padded with empty blocks (as in a batch) merges exactly as alone: its last
    blocks' missing neighbours are zeros either way, whatever the padding slots hold."""
    blocks = torch.randn(1, 5, 4, HIDDEN)
    mask = torch.ones(1, 5, 4, dtype=torch.bool)
    mask[0, 4, 2:] = False  # a partial last block
    encoder = MergeEncoder(HIDDEN, 4, context=context)
    perturb_mlp(encoder)
    alone = encoder(blocks, mask)
    padded = torch.cat([blocks, torch.randn(1, 3, 4, HIDDEN) * 1e3], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, 4, dtype=torch.bool)], dim=1)
    out = encoder(padded, padded_mask)
    torch.testing.assert_close(out[:, :5], alone, rtol=0, atol=0)
    assert torch.equal(out[:, 5:], torch.zeros_like(out[:, 5:]))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_context_rejected(bad):
    with pytest.raises(KMergeConfigError, match="encoder context must be an integer >= 0"):
        MergeEncoder(HIDDEN, 4, context=bad)


def test_attention_pooling_is_a_softmax_weighted_mean_of_the_real_tokens():
    blocks, mask = random_blocks(4, seed=5)
    encoder = MergeEncoder(HIDDEN, 4, attention_pooling=True)
    with torch.no_grad():
        encoder.pool_score.weight.normal_()  # a trained score; the MLP branch stays at zero
    out = encoder(blocks, mask)
    for i, j in [(0, 0), (1, 0), (2, 3)]:
        real = blocks[i, j][mask[i, j]]
        weights = (real @ encoder.pool_score.weight[0]).softmax(0)
        torch.testing.assert_close(out[i, j], weights @ real)
    assert (out - masked_mean(blocks, mask)).abs().max() > 1e-2  # no longer the plain mean


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True, None])
def test_bad_k_rejected(bad):
    """K must be an int >= 1; the error names the value."""
    with pytest.raises(KMergeConfigError, match="K must be an integer >= 1") as info:
        check_k(bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    with pytest.raises(KMergeConfigError):
        MergeEncoder(HIDDEN, bad)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_good_k_accepted(k):
    assert check_k(k) == k


def test_input_norm_layer():
    """input_norm puts a LayerNorm over the concatenated block in front of the MLP."""
    encoder = MergeEncoder(HIDDEN, 3, input_norm=True)
    assert isinstance(encoder.mlp[0], torch.nn.LayerNorm)
    assert encoder.mlp[0].normalized_shape == (3 * HIDDEN,)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in MergeEncoder(HIDDEN, 3).mlp)
    assert list(MergeEncoder(HIDDEN, 1, input_norm=True).parameters()) == []


def test_bad_num_layers_rejected():
    with pytest.raises(KMergeConfigError, match="num_layers must be >= 1, got 0"):
        MergeEncoder(HIDDEN, 2, num_layers=0)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_num_layers_shapes_and_average_init(num_layers):
    """Any depth: the right number of linear layers, and still the mean at init."""
    encoder = MergeEncoder(HIDDEN, 3, mlp_hidden_size=5, num_layers=num_layers)
    linears = [m for m in encoder.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == num_layers
    assert linears[0].in_features == 3 * HIDDEN and linears[-1].out_features == HIDDEN
    blocks, mask = random_blocks(3)
    torch.testing.assert_close(encoder(blocks, mask), masked_mean(blocks, mask))


@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 4, HIDDEN + 1),  # wrong hidden size
        (2, 3, 3, HIDDEN),  # wrong K
        (2, 12, HIDDEN),  # not split into blocks
        (1, 2, 3, 4, HIDDEN),  # too many dimensions
    ],
)
def test_wrong_input_shape_rejected(shape):
    """A tensor of the wrong shape is refused with the expected and the actual shape."""
    encoder = MergeEncoder(HIDDEN, 4)
    blocks = torch.randn(*shape)
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    with pytest.raises(KMergeConfigError, match=r"expects blocks \[B, N, 4, 8\]") as info:
        encoder(blocks, mask)
    assert str(list(shape)) in str(info.value)
