"""Calibration state, binding, per-channel folding, and the error paths."""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch

from pipeline.errors import PipelineError
from pipeline.quant.calibration import CalibState, bind, calibrate, stored_weight_codes
from pipeline.quant.quantizers import fake_quantize, qrange
from pipeline.quant.recipe import resolve_recipe
from pipeline.quant.sites import attach_sites, position_codes
from tests.conftest import compose

CPU = torch.device("cpu")


def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2).eval()


def batches(n: int = 3, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def calibrated(recipe: str = "recommended", *overrides: str, extra: dict | None = None):
    from omegaconf import OmegaConf, open_dict

    model = tiny_model()
    graph = attach_sites(model)
    quant = compose([f"quant={recipe}", *overrides]).quant
    if extra:
        with open_dict(quant):
            quant = OmegaConf.merge(quant, extra)
    specs = resolve_recipe(quant, graph)
    state = calibrate(graph, specs, batches(), CPU, list(quant.candidate_bits))
    return model, graph, specs, state


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.square().sum() / (ref - test).square().sum()))


def test_observers_only_watch_during_calibration():
    model = tiny_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=recommended"]).quant, graph)
    seen = []
    graph.set_tap(lambda site, x, y: seen.append(torch.equal(x, y)))
    calibrate(graph, specs, batches(1), CPU, [8, 16])
    assert seen and all(seen)  # every site returned its input unchanged


def test_state_holds_every_candidate_width_and_round_trips(tmp_path):
    _, graph, specs, state = calibrated("recommended", "quant.act.bits=6")
    entry = state.index["sites"]["blocks.1.attn.sv"]
    assert entry["bits"] == [6, 8, 16] and entry["role"] == "sv_attn"
    s8, _ = state.qparams("blocks.1.attn.sv", 8)
    s16, _ = state.qparams("blocks.1.attn.sv", 16)
    assert s8.shape == (192,) and (s16 < s8).all()  # per channel, finer at 16 bits
    assert state.index["sites"]["blocks.1.attn.softmax"]["bits"] == []  # log2: fixed scale, no observer
    state.save(tmp_path)
    again = CalibState.load(tmp_path)
    assert again.index == state.index
    assert all(torch.equal(again.tensors[k], v) for k, v in state.tensors.items())
    with pytest.raises(PipelineError, match="calibrated for bits \\[6, 8, 16\\], not 12"):
        state.qparams("blocks.1.attn.sv", 12)


def test_wider_activations_track_fp32_closer():
    model, graph, specs, state = calibrated("naive")
    x = batches(1, seed=7)[0][0]
    with torch.no_grad():
        ref = model(x)
        bind(graph, specs, state)
        w8a8 = graph.model(x)
        bind(graph, specs, state, {n: 16 for n in specs if graph[n].role != "weight"})
        w8a16 = graph.model(x)
    assert sqnr(ref, w8a16) > sqnr(ref, w8a8) + 6 > 16


def test_per_channel_scales_fold_into_the_consuming_weight():
    # min/max and plain rounding: hand-computable weight scales and codes
    _, graph, specs, state = calibrated("recommended", "quant.weight.observer=minmax", "quant.weight.gptq=false")
    bind(graph, specs, state)
    sv = graph["blocks.0.attn.sv"]
    proj = graph.module("blocks.0.attn.proj")
    assert sv.per_channel and graph.folds["blocks.0.attn.sv"] == "blocks.0.attn.proj"
    s = sv.scale
    folded = proj.weight * s[None, :]
    w_scale = folded.abs().amax(dim=1) / 127
    qmin, qmax = qrange(8, True)
    expected = fake_quantize(folded, w_scale, torch.zeros_like(w_scale), qmin, qmax, axis=0) / s[None, :]
    torch.testing.assert_close(proj.qweight, expected, rtol=1e-6, atol=1e-9)
    # The integer form the NPU runs: integer codes times the folded integer weight.
    x = torch.randn(4, 17, 192) * 3
    codes = torch.clamp(torch.floor(x / s + 0.5) + sv.zero_point, sv.qmin, sv.qmax)
    w_int = torch.clamp(torch.floor(folded / w_scale[:, None] + 0.5), qmin, qmax)
    integer_path = (codes - sv.zero_point) @ w_int.T * w_scale
    torch.testing.assert_close(torch.nn.functional.linear(sv(x), proj.qweight), integer_path, rtol=1e-4, atol=1e-4)


def test_bias_is_an_integer_on_the_accumulator_step():
    _, graph, specs, state = calibrated("recommended", "quant.weight.observer=minmax", "quant.weight.gptq=false")
    bind(graph, specs, state)
    # A folded input (sv_attn per channel into proj): the accumulator's step is the weight row's scale.
    proj = graph.module("blocks.0.attn.proj")
    with torch.no_grad():
        proj.bias.copy_(torch.linspace(-0.5, 0.5, 192))
    codes, step = proj.bias_codes()
    assert torch.equal(step, proj.weight_site.scale.double())
    assert torch.equal(codes, torch.floor(proj.bias.double() / step + 0.5).long())
    torch.testing.assert_close(proj.effective_bias(), (codes * step).float(), rtol=0, atol=0)
    assert (proj.effective_bias() != proj.bias).any()  # the float bias is not on that grid
    # A per-tensor input (the head): step = s_w · s_x, and the layer is the NPU's integer accumulator.
    head = graph.module("head")
    with torch.no_grad():
        head.bias.copy_(torch.linspace(-1, 1, 10))
    s_x, z_x = head.in_site.scale, head.in_site.zero_point
    assert not head.in_site.per_channel
    x = torch.randn(4, 192) * 2
    x_codes = torch.clamp(torch.floor(x / s_x + 0.5) + z_x, head.in_site.qmin, head.in_site.qmax).long()
    w_codes = stored_weight_codes(graph, "head.weight").long()
    b_codes, step = head.bias_codes()
    torch.testing.assert_close(step, (head.weight_site.scale * s_x).double())
    accumulator = (x_codes - z_x.long()) @ w_codes.T + b_codes  # int64
    with torch.no_grad():
        torch.testing.assert_close(head(x).double(), accumulator.double() * step, rtol=1e-6, atol=1e-6)
    # A narrow bias saturates; bias_bits 0 and a float input keep the float bias.
    head.weight_site.spec = replace(head.weight_site.spec, bias_bits=8)
    with torch.no_grad():
        head.bias.mul_(1e4)
    assert head.bias_codes()[0].abs().max() == 128 and head.bias_codes()[0].max() <= 127
    head.weight_site.spec = replace(head.weight_site.spec, bias_bits=0)
    assert head.bias_codes() is None and head.effective_bias() is head.bias
    head.weight_site.spec = replace(head.weight_site.spec, bias_bits=32)
    head.in_site.mode = "fp"
    assert head.bias_codes() is None and head.effective_bias() is head.bias


def test_position_embedding_is_an_integer_bias_on_the_patch_accumulator():
    # timm adds pos_embed to the patch conv's output; on the NPU that add is a second bias in the conv's
    # integer accumulator, one per position and channel: block 0's input is (acc + b_q + pos_q) · step.
    _, graph, specs, state = calibrated("recommended", "quant.weight.observer=minmax", "quant.weight.gptq=false")
    bind(graph, specs, state)
    model, conv = graph.model, graph.module("patch_embed.proj")
    with torch.no_grad():
        model.pos_embed.add_(torch.linspace(-0.3, 0.3, model.pos_embed.numel()).reshape(model.pos_embed.shape))
    codes, step = position_codes(model)
    assert torch.equal(step, conv.accumulator_step().double()) and codes.shape == (1, model.pos_embed.shape[1] - 1, 192)
    assert torch.equal(codes, torch.floor(model.pos_embed.detach()[:, 1:].double() / step + 0.5).long())
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].clone()), prepend=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
        patches = conv(images).flatten(2).transpose(1, 2)  # (acc + b_q) · step
        expected = (patches.double() / step).round() + codes  # the integer accumulator's codes
    off_grid = seen["x"][:, 1:].double() / step - expected  # in accumulator steps: float32 holds ~2^24 of them
    assert off_grid.abs().max() < 0.1
    timm_add = (patches + model.pos_embed[:, 1:]).double() / step - expected  # the float embedding is off the grid
    assert timm_add.abs().max() > 0.3
    torch.testing.assert_close(seen["x"][:, :1], (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), rtol=0, atol=0)
    assert isinstance(model.pos_embed, torch.nn.Parameter)  # put back after the forward
    # bias_bits 0 keeps it float, like the bias; an unquantized conv runs timm's own add.
    conv.weight_site.spec = replace(conv.weight_site.spec, bias_bits=0)
    assert position_codes(model) is None
    conv.weight_site.spec = replace(conv.weight_site.spec, bias_bits=32)
    conv.in_site.mode = "fp"
    assert position_codes(model) is None


def test_dynamic_image_size_keeps_a_float_position_embedding_and_runs_at_other_sizes():
    # timm resamples pos_embed per input size: no fixed integer bias to store, so the add stays timm's own
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1, dynamic_img_size=True).eval()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=w8a16", "quant.weight.gptq=false"]).quant, graph)
    state = calibrate(graph, specs, batches(), CPU, [16])
    bind(graph, specs, state)
    assert position_codes(graph.model) is None
    wide = torch.randn(2, 3, 32, 48)  # another size than the calibration's
    with torch.no_grad():
        ref, quantized = model(wide), graph.model(wide)
        graph.set_mode("off")
        assert torch.equal(graph.model(wide), ref)
    assert sqnr(ref, quantized) > 30  # random weights: W8A16 keeps about 37 dB at the calibration size


def w16a16_sqnr(model: torch.nn.Module, granularity: str):
    """(graph, logit SQNR in dB) of `model` with every site at 16 bits, the foldable activations at `granularity`."""
    graph = attach_sites(model)
    roles = {role: {"granularity": granularity} for role in ("linear_in", "norm_out", "sv_attn", "mlp_act")}
    specs = resolve_recipe({"enabled": True, "weight": {"bits": 16, "granularity": "per_channel", "symmetric": True}, "act": {"bits": 16}, "roles": roles}, graph)
    data = batches(2)
    state = calibrate(graph, specs, data, CPU, [16])
    with torch.no_grad():
        ref = model(data[0][0])
        bind(graph, specs, state)
        return graph, sqnr(ref, graph.model(data[0][0]))


def test_folded_weights_keep_16_bit_resolution():
    # 16-bit per-channel activation scales (~1e-4) folded into 16-bit weights give weight steps far
    # below float32 eps; they must not be floored there (that left the folded model at ~10 dB).
    sqnrs = {}
    for granularity in ("per_tensor", "per_channel"):
        graph, sqnrs[granularity] = w16a16_sqnr(tiny_model(), granularity)
    assert (graph.module("blocks.0.attn.qkv").weight_site.scale < 1e-7).any()  # folded steps below eps, kept
    assert sqnrs["per_channel"] > 55 and sqnrs["per_channel"] > sqnrs["per_tensor"] - 3


def test_every_optional_layer_norm_folds_into_its_matmul_at_16_bits():
    # scale_attn_norm / scale_mlp_norm put a LayerNorm before proj / fc2, and fc_norm emits the head's
    # input: each folds per channel like norm1 -> qkv, and each consumer runs on an integer accumulator.
    from tests.test_sites import build

    graph, logit_sqnr = w16a16_sqnr(build("vit_every_norm"), "per_channel")
    assert logit_sqnr > 55
    for producer, consumer in (("blocks.1.attn.norm", "blocks.1.attn.proj"), ("blocks.1.mlp.norm", "blocks.1.mlp.fc2"), ("fc_norm", "head")):
        assert graph.folds[producer] == consumer and graph[producer].per_channel
        assert graph.module(consumer).bias_codes() is not None, consumer


def test_layer_scale_is_folded_into_the_stored_weight():
    # DeiT III's LayerScale gamma multiplies proj's / fc2's output channels: an NPU stores diag(gamma)·W,
    # so with a per-tensor weight grid it is diag(gamma)·W that must sit on the grid, not W.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1, init_values=1.0).eval()
    with torch.no_grad():
        for block in model.blocks:
            for ls in (block.ls1, block.ls2):
                ls.gamma.copy_(torch.logspace(-3, 0, ls.gamma.numel()) * torch.where(torch.arange(ls.gamma.numel()) % 2 == 0, 1.0, -1.0))
                ls.gamma[-1] = 0.0  # a pruned row: stored as zeros
        for linear in (model.blocks[0].attn.proj, model.blocks[0].mlp.fc2):
            linear.bias.copy_(torch.linspace(-0.5, 0.5, linear.bias.numel()))  # timm's zero init would pin nothing
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=naive"]).quant, graph)
    bind(graph, specs, calibrate(graph, specs, batches(1), CPU, [8]))
    for path, ls in (("blocks.0.attn.proj", "blocks.0.ls1"), ("blocks.0.mlp.fc2", "blocks.0.ls2")):
        module, gamma = graph.module(path), graph.module(ls).gamma
        assert module.weight_site.scale.numel() == 1  # naive: one scale per weight tensor
        codes = module.qweight * gamma[:, None] / module.weight_site.scale
        assert (codes - codes.round()).abs().max() < 1e-3 and codes.abs().max() <= 128
        assert (codes.round() != 0).sum(dim=1)[:-1].min() < 20  # rows with a small gamma keep few levels, as on the NPU
        assert torch.isfinite(module.qweight).all() and (module.qweight[-1] == 0).all()
        # The stored bias is gamma·b on the stored rows' accumulator grid; back in b's units it is 0 where gamma is.
        bias_codes, step = module.bias_codes()
        assert torch.equal(bias_codes, torch.floor(gamma.detach().double() * module.bias.detach().double() / step + 0.5).long())
        with torch.no_grad():
            torch.testing.assert_close(module.effective_bias().double() * gamma.double(), bias_codes * step, rtol=1e-6, atol=1e-12)
        assert module.effective_bias()[-1] == 0


def test_per_channel_image_input_folds_into_the_patch_embedding():
    _, graph, specs, state = calibrated("recommended", "quant.weight.observer=minmax", "quant.weight.gptq=false")
    bind(graph, specs, state)
    site, conv = graph["patch_embed.proj.in"], graph.module("patch_embed.proj")
    assert site.granularity == "per_channel" and site.scale.shape == (3,) and graph.folds[site.name] == "patch_embed.proj"
    s, zp = site.scale.view(1, 3, 1, 1), site.zero_point.view(1, 3, 1, 1)
    folded = conv.weight * s  # every input-channel slice of the conv absorbs its colour channel's scale
    w_scale = folded.abs().amax(dim=(1, 2, 3)) / 127
    qmin, qmax = qrange(8, True)
    expected = fake_quantize(folded, w_scale, torch.zeros_like(w_scale), qmin, qmax, axis=0) / s
    torch.testing.assert_close(conv.qweight, expected, rtol=1e-6, atol=1e-9)
    # The integer form: per-channel image codes convolved with the folded integer weight.
    x = torch.randn(2, 3, 32, 32) * torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
    codes = torch.clamp(torch.floor(x / s + 0.5) + zp, site.qmin, site.qmax)
    w_int = torch.clamp(torch.floor(folded / w_scale.view(-1, 1, 1, 1) + 0.5), qmin, qmax)
    integer_path = torch.nn.functional.conv2d(codes - zp, w_int, stride=conv.stride) * w_scale.view(1, -1, 1, 1) + conv.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), integer_path, rtol=1e-4, atol=1e-4)


def test_gptq_state_keeps_input_hessians_and_lowers_the_output_error(tmp_path):
    from pipeline.quant.gptq import gptq_fake_quantize, output_error

    _, graph, specs, state = calibrated("recommended", "quant.weight.bits=4")
    qkv, conv = "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"
    assert state.hessian(qkv).shape == (192, 192) and state.hessian(conv).shape == (3 * 8 * 8,) * 2
    assert state.index["sites"][qkv]["hessian"] is True
    state.save(tmp_path)
    assert torch.equal(CalibState.load(tmp_path).hessian(qkv), state.hessian(qkv))
    bind(graph, specs, state)
    module, norm1 = graph.module("blocks.0.attn.qkv"), graph["blocks.0.norm1"]
    s = norm1.scale  # norm1's per-channel scales fold into qkv's columns; the folded weight sees x / s
    folded = module.weight * s[None, :]
    site = module.weight_site
    expected = gptq_fake_quantize(folded, state.hessian(qkv) / (s[:, None] * s[None, :]), site.scale, site.zero_point, site.qmin, site.qmax) / s[None, :]
    torch.testing.assert_close(module.qweight, expected, rtol=1e-6, atol=1e-7)
    # the patch embedding: the image's colour-channel scales fold into the conv, one per 8x8 slice of columns
    embed, image = graph.module("patch_embed.proj"), graph["patch_embed.proj.in"]
    columns = image.scale.repeat_interleave(64)
    folded = embed.weight * image.scale.view(1, 3, 1, 1)
    site = embed.weight_site
    expected = gptq_fake_quantize(folded.flatten(1), state.hessian(conv) / (columns[:, None] * columns[None, :]), site.scale, site.zero_point, site.qmin, site.qmax)
    torch.testing.assert_close(embed.qweight, expected.view_as(folded) / image.scale.view(1, 3, 1, 1), rtol=1e-6, atol=1e-7)
    gptq_error = output_error(module.weight, module.qweight, state.hessian(qkv))
    bind(graph, {n: replace(sp, gptq=False) for n, sp in specs.items()}, state)
    assert gptq_error < 0.8 * output_error(module.weight, module.qweight, state.hessian(qkv))


def test_gptq_without_hessians_in_the_state_is_an_error():
    _, graph, specs, state = calibrated("recommended", "quant.weight.gptq=false")
    with pytest.raises(PipelineError, match="weight site patch_embed.proj.weight asks gptq .* recalibrate"):
        bind(graph, {n: replace(sp, gptq=sp.gptq or graph[n].role == "weight") for n, sp in specs.items()}, state)


def test_per_channel_v_scales_are_attention_times_v_output_channel_scales():
    _, graph, specs, state = calibrated("recommended")
    bind(graph, specs, state)
    v = graph["blocks.0.attn.v"]
    assert v.granularity == "per_channel" and v.scale.shape == (192,) and "blocks.0.attn.v" not in graph.folds
    heads = lambda t: t.reshape(2, 17, 3, 64).transpose(1, 2)  # noqa: E731  (B, N, C) -> (B, H, N, D)
    x = torch.randn(2, 17, 192) * torch.linspace(0.1, 4, 192)
    attn = torch.softmax(torch.randn(2, 3, 17, 17), dim=-1)
    codes = torch.clamp(torch.floor(x / v.scale + 0.5) + v.zero_point, v.qmin, v.qmax)
    accumulators = attn @ heads(codes - v.zero_point)  # the NPU's matmul on integer v codes
    requantized = accumulators * heads(v.scale.expand(2, 17, 192))  # one scale per output channel, as for a weight
    torch.testing.assert_close(attn @ heads(v(x)), requantized, rtol=1e-5, atol=1e-6)


def test_ptf_residual_scales_are_power_of_two_factors_and_align_exactly():
    _, graph, specs, state = calibrated("recommended")
    bind(graph, specs, state)
    res, spec = graph["blocks.1.res1"], specs["blocks.1.res1"]
    assert spec.granularity == "ptf" and res.granularity == "ptf" and res.scale.shape == (192,) and spec.ptf_frac_bits == 2
    unit = res.scale.max() / 2**spec.ptf_shift / 2**spec.ptf_frac_bits  # s_base / 2^f
    factor = res.scale / unit  # m_c << k_c, an integer
    assert torch.equal(factor, factor.round()) and factor.min() >= 2**spec.ptf_frac_bits
    shift = torch.floor(torch.log2(factor)).to(torch.int32) - spec.ptf_frac_bits
    mantissa = (factor / torch.exp2(shift.float())).to(torch.int32)
    assert shift.min() >= 0 and shift.max() == spec.ptf_shift and len(mantissa.unique()) > 1
    # The NPU's LayerNorm input: codes of every channel brought to the common scale s_base / 2^f by
    # a multiply by the (f + 1)-bit mantissa and a left shift, with no rounding.
    x = torch.randn(2, 17, 192) * torch.linspace(0.1, 4, 192)
    codes = torch.clamp(torch.floor(x / res.scale + 0.5) + res.zero_point, res.qmin, res.qmax).to(torch.int32)
    aligned = ((codes - res.zero_point.to(torch.int32)) * mantissa) << shift
    assert torch.equal(res(x), aligned.float() * unit)


def test_disabled_sites_stay_fp32():
    model, graph, specs, state = calibrated("recommended")
    off = {n: replace(s, enabled=False) for n, s in specs.items()}
    bind(graph, off, state)
    x = batches(1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(graph.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_int_softmax_recipe_runs_close_to_float_softmax():
    model, graph, specs, state = calibrated("recommended", "quant.roles.intSoft.quantizer=int_softmax", "quant.roles.intSoft.frac_bits=0", extra={"roles": {"scores": {"symmetric": True, "bits": 16}}})
    bind(graph, specs, state)
    x = batches(1)[0][0]
    with torch.no_grad():
        assert sqnr(model(x), graph.model(x)) > 10


def test_nan_calibration_data_names_the_site():
    graph = attach_sites(tiny_model())
    specs = resolve_recipe(compose(["quant=naive"]).quant, graph)
    bad = [(torch.full((2, 3, 32, 32), float("nan")), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(PipelineError, match="calibration data produce NaN or Inf at site patch_embed.proj.in"):
        calibrate(graph, specs, bad, CPU, [8])
    model = tiny_model()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 5] = float("inf")
    graph = attach_sites(model)
    with pytest.raises(PipelineError, match="the model's weight holds NaN or Inf at site blocks.1.mlp.fc1.weight"):
        calibrate(graph, specs, batches(1), CPU, [8])  # named as the weight, not as the data at the next activation


def test_a_site_the_forward_never_reaches_is_named():
    model = tiny_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=naive"]).quant, graph)
    head = graph.model.head
    graph.model.forward_head = lambda x, pre_logits=False: torch.nn.functional.linear(x[:, 0], head.weight, head.bias)  # skips head.in
    with pytest.raises(PipelineError, match="site head.in saw no data in calibration"):
        calibrate(graph, specs, batches(1), CPU, [8])


def test_zero_calibration_batches_is_an_error():
    graph = attach_sites(tiny_model())
    specs = resolve_recipe(compose(["quant=naive"]).quant, graph)
    with pytest.raises(PipelineError, match="zero batches"):
        calibrate(graph, specs, [], CPU, [8])


def test_quantizer_sqnr_is_each_sites_own_error():
    from pipeline.profile.collect import quantizer_sqnr

    _, graph, specs, state = calibrated("naive")
    bind(graph, specs, state)
    name = "blocks.1.attn.sv"
    seen = {}
    graph.set_tap(lambda site, x, y: seen.setdefault(site.name, (x.clone(), y.clone())), [name])
    images = [b[0] for b in batches(1)]
    with torch.no_grad():
        graph.model(images[0])
    graph.set_tap(None)
    x, y = (t.double() for t in seen[name])
    expected = 10 * torch.log10(x.square().sum() / (x - y).square().sum()).item()
    own = quantizer_sqnr(graph, images, CPU)
    assert own[name] == pytest.approx(expected, rel=1e-9)
    assert set(own) == {n for n, s in graph.sites.items() if s.mode == "quant" and s.role != "weight"}  # weights are not in the data path


def test_weight_range_search_takes_each_row_whole():
    """A weight is observed once: omse searches all of each row (768 > the activations' 512-value sample)."""
    from pipeline.quant.calibration import weight_observer
    from pipeline.quant.recipe import SiteSpec

    weight = torch.randn(4, 768)
    observer = weight_observer(SiteSpec(observer="omse", loss="l2", granularity="per_channel", symmetric=True, signed=True), weight)
    observer(weight)
    assert torch.equal(observer.samples.sort(dim=1).values, weight.sort(dim=1).values)
    sampled = weight_observer(SiteSpec(observer="omse", loss="l2", granularity="per_channel", samples=100), weight)
    sampled(weight)
    assert sampled.samples.shape == (4, 100)


@pytest.mark.parametrize("rounding, code", [("half_up", 1), ("half_even", 0)])
def test_bias_ties_follow_the_recipe_rounding(rounding, code):
    _, graph, specs, state = calibrated("naive", f"quant.rounding={rounding}")
    bind(graph, specs, state)
    head = graph.module("head")
    step = head.accumulator_step()
    with torch.no_grad():
        head.bias.copy_((step * 0.5).expand_as(head.bias))  # exactly half a step: a tie
    assert torch.equal(head.bias_codes()[0], torch.full((10,), code))


def test_rebinding_refolds_the_weight_with_the_new_producer_scales():
    model, graph, specs, state = calibrated("recommended", "quant.weight.gptq=false")
    bind(graph, specs, state)
    bind(graph, specs, state, {"blocks.0.attn.sv": 16})  # sv's per-channel 16-bit scales now fold into proj
    fresh = attach_sites(model)
    bind(fresh, specs, state, {"blocks.0.attn.sv": 16})
    assert torch.equal(graph.module("blocks.0.attn.proj").qweight, fresh.module("blocks.0.attn.proj").qweight)


def test_bind_applies_a_weight_width_assignment():
    _, graph, specs, state = calibrated("naive")
    bind(graph, specs, state, {"blocks.0.mlp.fc1.weight": 16})
    assert graph["blocks.0.mlp.fc1.weight"].bits == 16 and graph["blocks.0.mlp.fc2.weight"].bits == 8
    w = graph.module("blocks.0.mlp.fc1")
    assert (w.qweight - w.weight).abs().max() < w.weight.abs().max() / 2**14


def test_a_damaged_state_is_one_line_naming_the_site():
    _, graph, specs, state = calibrated("naive")
    damaged = CalibState(dict(state.tensors), state.index)
    del damaged.tensors["blocks.0.attn.sv/8/scale"]
    with pytest.raises(PipelineError, match="index lists width 8 for site blocks.0.attn.sv but state.safetensors has no tensor blocks.0.attn.sv/8/scale"):
        bind(graph, specs, damaged)
    damaged = CalibState(dict(state.tensors), state.index)
    damaged.tensors["blocks.0.attn.sv/8/scale"] = torch.tensor([float("nan")])
    with pytest.raises(PipelineError, match="site blocks.0.attn.sv: the state's 8-bit scale is not finite and positive"):
        bind(graph, specs, damaged)
    damaged = CalibState(dict(state.tensors), state.index)
    damaged.tensors["blocks.0.mlp.fc1.weight/8/codes"] = torch.zeros(3, 3, dtype=torch.int8)
    with pytest.raises(PipelineError, match=r"weight site blocks.0.mlp.fc1.weight: stored codes \(3, 3\) do not fit the weight \(768, 192\)"):
        bind(graph, specs, damaged)


def test_a_damaged_state_with_an_infinite_scale_or_a_zero_point_of_another_size_is_one_line():
    """README: a scale that is not finite (inf as well as NaN) or does not match its zero point is a damaged state."""
    from pipeline.errors import PipelineError
    from pipeline.quant.calibration import CalibState, bind
    from tests.test_calibration import calibrated

    _, graph, specs, state = calibrated("naive")
    damaged = CalibState(dict(state.tensors), state.index)
    damaged.tensors["blocks.0.attn.sv/8/scale"] = torch.tensor([float("inf")])
    with pytest.raises(PipelineError, match="site blocks.0.attn.sv: the state's 8-bit scale is not finite and positive"):
        bind(graph, specs, damaged)
    damaged = CalibState(dict(state.tensors), state.index)
    damaged.tensors["blocks.0.attn.sv/8/zero_point"] = torch.zeros(3)  # per-tensor scale, three zero points
    with pytest.raises(PipelineError, match="site blocks.0.attn.sv: .* does not match its zero point"):
        bind(graph, specs, damaged)
