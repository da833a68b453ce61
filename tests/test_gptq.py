"""Tests of pipeline.quant.gptq: error feedback on the weight grid, and the Hessian hooks."""

import torch
from torch import nn

from pipeline.quant.gptq import HessianHooks, gptq_fake_quantize, output_error
from pipeline.quant.quantizers import fake_quantize


def _grid(weight: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per-row symmetric min/max scales for `bits` (signed)."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(1) / qmax
    return scale, torch.zeros_like(scale), -qmax - 1, qmax


def _correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    return torch.randn(tokens, features, generator=g) @ mix * torch.linspace(0.2, 3.0, features)


def test_diagonal_hessian_gives_plain_rounding():
    """Nothing couples the columns: every column keeps its own nearest code, bit for bit."""
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    scale, zp, qmin, qmax = _grid(w)
    h = torch.diag(torch.rand(24, generator=torch.Generator().manual_seed(2)) + 0.1)
    got = gptq_fake_quantize(w, h, scale, zp, qmin, qmax, block=7)
    assert torch.equal(got, fake_quantize(w, scale, zp, qmin, qmax, axis=0))


def test_error_feedback_lowers_the_output_error_and_stays_on_the_grid():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(2048, 48)
    h = x.T @ x
    scale, zp, qmin, qmax = _grid(w, bits=3)
    plain = fake_quantize(w, scale, zp, qmin, qmax, axis=0)
    got = gptq_fake_quantize(w, h, scale, zp, qmin, qmax, block=16)
    assert output_error(w, got, h) < 0.7 * output_error(w, plain, h)
    codes = got / scale.view(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    # blocking is a speed device: the same codes whatever the block size
    assert torch.allclose(gptq_fake_quantize(w, h, scale, zp, qmin, qmax, block=48), got, atol=1e-6)


def test_dead_inputs_do_not_break_the_factorisation():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))
    x = _correlated_inputs(256, 12)
    x[:, 5] = 0.0  # an input that never fires: H has a zero row and column
    scale, zp, qmin, qmax = _grid(w)
    got = gptq_fake_quantize(w, x.T @ x, scale, zp, qmin, qmax)
    assert torch.isfinite(got).all()


def test_hessian_hooks_accumulate_x_transpose_x_over_tokens():
    layer = nn.Sequential(nn.Linear(6, 5))
    hooks = HessianHooks(layer, ["0"], stride=1)
    a, b = torch.randn(2, 3, 6), torch.randn(4, 6)
    layer(a)
    layer(b)
    hooks.remove()
    layer(torch.randn(3, 6))  # removed: no longer counted
    x = torch.cat([a.reshape(-1, 6), b])
    assert torch.allclose(hooks.hessians["0.weight"], x.T @ x, atol=1e-5)


def test_hessian_hooks_take_every_kth_token_across_batches():
    layer = nn.Sequential(nn.Linear(4, 2))
    hooks = HessianHooks(layer, ["0"], stride=3)
    a, b = torch.randn(5, 4), torch.randn(7, 4)
    layer(a)
    layer(b)
    x = torch.cat([a, b])[::3]  # the stream's tokens 0, 3, 6, 9: a[0], a[3], b[1], b[4]
    assert torch.allclose(hooks.hessians["0.weight"], x.T @ x, atol=1e-5)


def test_hessian_hooks_reach_every_token_position_when_tokens_per_image_divide_by_the_stride():
    """8 tokens per image, stride 4: the stride becomes 5 (coprime with 8), so the picks cover all 8 positions."""
    layer = nn.Sequential(nn.Linear(8, 2))
    hooks = HessianHooks(layer, ["0"], stride=4)
    position = torch.eye(8).expand(10, 8, 8)  # token t of every image is the unit vector e_t
    layer(position[:4])
    layer(position[4:])
    counts = hooks.hessians["0.weight"].diagonal()  # how often each position entered H
    assert torch.equal(counts, torch.full((8,), 2.0))  # 80 tokens, every 5th: 16 picks, each position twice


def test_hessian_hooks_see_conv_patches_in_weight_order():
    conv = nn.Sequential(nn.Conv2d(2, 3, kernel_size=2, stride=2))
    hooks = HessianHooks(conv, ["0"], stride=1)
    x = torch.randn(1, 2, 4, 4)
    conv(x)
    patches = x.reshape(1, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(4, 8)  # (patch, C*kh*kw)
    assert torch.allclose(hooks.hessians["0.weight"], patches.T @ patches, atol=1e-5)
    w = conv[0].weight.flatten(1)
    assert torch.allclose(patches @ w.T + conv[0].bias, conv(x).flatten(2).transpose(1, 2)[0], atol=1e-5)


def test_gptq_rounds_the_loudest_input_first():
    """README: 'column by column, loudest inputs first': the column with the largest H diagonal has no
    earlier error to absorb, so it is plain rounding; later columns are not."""
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(2048, 48)
    h = x.T @ x
    scale, zp, qmin, qmax = _grid(w, bits=3)
    got = gptq_fake_quantize(w, h, scale, zp, qmin, qmax)
    plain = fake_quantize(w, scale, zp, qmin, qmax, axis=0)
    order = torch.argsort(h.diagonal(), descending=True)
    assert torch.equal(got[:, order[0]], plain[:, order[0]])
    assert not torch.equal(got[:, order[-1]], plain[:, order[-1]])
