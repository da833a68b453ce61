"""Quant sites: full coverage of timm ViT/DeiT variants, names and roles, bit-identity when off."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import GluMlp
from timm.models.vision_transformer import ResPostBlock

from pipeline.errors import PipelineError
from pipeline.profile.collect import forward_segments
from pipeline.quant.sites import attach_sites

VARIANTS = {
    "vit_cls": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, num_classes=10, depth=2)),
    "vit_gap": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, num_classes=10, depth=2, global_pool="avg", class_token=False, fc_norm=True)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, num_classes=10, depth=3)),
    "vit_wide_heads": ("vit_small_patch16_224", dict(img_size=32, patch_size=16, num_classes=5, depth=1, num_heads=12)),
    "vit_registers": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, num_classes=10, depth=2, reg_tokens=4)),  # quantized with the class token at blocks.0.in
    "deit3_layer_scale": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, num_classes=10, depth=2, init_values=0.1, no_embed_class=True)),
    # every optional LayerNorm timm's VisionTransformer has: after the patch conv, before the blocks
    # (CLIP's pre_norm), on q and k, inside attention and MLP, and fc_norm after average pooling
    "vit_every_norm": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, num_classes=10, depth=2, embed_norm_layer="layernorm", pre_norm=True, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True, global_pool="avg", class_token=False, fc_norm=True),
    ),
}
FC_NORM = {"vit_gap", "vit_every_norm"}  # fc_norm emits the head's input: no head.in site


def build(variant: str) -> torch.nn.Module:
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sites_off_is_bit_identical_and_fp_mode_matches(variant):
    model = build(variant)
    graph = attach_sites(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(graph.model(x), ref)  # every site off: timm's own forward
        graph.set_mode("fp")  # explicit attention path, no quantization
        torch.testing.assert_close(graph.model(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_segments_compose_to_the_models_own_forward(variant):
    model = build(variant)
    graph = attach_sites(model)
    graph.set_mode("fp")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for m in (model, graph.model):
            pieces = forward_segments(m)
            assert len(pieces) == len(m.blocks) + 2  # stem, blocks, norm + head
            y = x
            for piece in pieces:
                y = piece(y)
            assert torch.equal(y, m(x))


def test_forward_segments_of_a_model_with_its_own_forward_is_the_whole_model():
    model = build("vit_cls")

    class Doubled(type(model)):
        def forward(self, x):
            return 2 * super().forward(x)

    model.__class__ = Doubled
    assert forward_segments(model) == [model]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_npu_quantization_point_has_a_site(variant):
    model = build(variant)
    graph = attach_sites(model)
    depth = len(model.blocks)
    per_block = {"weight": 4, "norm_out": 2, "qkv": 3, "scores": 1, "intSoft": 1, "sv_attn": 1, "mlp_act": 1, "residual": 2}
    counts = {}
    for site in graph:
        counts[site.role] = counts.get(site.role, 0) + 1
    heads = 2 if variant == "deit_distilled" else 1
    assert counts["weight"] == depth * 4 + 1 + heads  # + patch embedding + head(s)
    for role, n in per_block.items():
        if role != "weight":
            assert counts[role] >= depth * n, role
    assert counts.get("head_in", 0) == heads - (variant in FC_NORM) and counts["linear_in"] == 1
    names = set(graph.names())
    for leaf in ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.softmax", "attn.sv", "mlp.act", "norm1", "norm2", "res1", "res2", "attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
        assert f"blocks.{depth - 1}.{leaf}" in names, leaf
    assert {"patch_embed.proj.weight", "patch_embed.proj.in", "blocks.0.in", "head.weight"} <= names
    assert ("head.in" in names) == (variant not in FC_NORM) and ("fc_norm.in" in names) == (variant in FC_NORM)
    assert graph["blocks.0.attn.sv"].role == "sv_attn" and graph["blocks.0.attn.softmax"].role == "intSoft"
    assert graph[f"blocks.{depth - 1}.attn.sv"].block == depth - 1 and graph["head.weight"].block is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layer_norm_input_and_output_is_quantized_exactly_once(variant):
    # In fp mode a site returns the very tensor it got, so a tensor that two sites quantize (the same
    # values rounded twice) is the output of two sites, and one that no site quantizes of none.
    model = build(variant)
    graph = attach_sites(model)
    graph.set_mode("fp")
    outputs: list[torch.Tensor] = []
    graph.set_tap(lambda site, x, y: outputs.append(y))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    norms = {name: m for name, m in graph.model.named_modules() if isinstance(m, torch.nn.LayerNorm)}

    def record(name: str):
        def hook(module, args, out) -> None:  # runs after the sites' own hooks: sees what they returned
            seen[name] = (args[0], out)

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in norms.items()]
    with torch.no_grad():
        graph.model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(outputs) == len([n for n in graph.names() if graph[n].role != "weight"])  # each site once
    assert set(seen) == set(norms)
    for name, (x, y) in seen.items():
        assert sum(o is x for o in outputs) == 1, f"{name} input"
        assert sum(o is y for o in outputs) == 1, f"{name} output"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_site_names_are_in_forward_order(variant):
    graph = attach_sites(build(variant))
    graph.set_mode("fp")
    order: list[str] = []
    graph.set_tap(lambda site, x, y: order.append(site.name))
    with torch.no_grad():
        graph.model(torch.randn(2, 3, 32, 32))
    assert order == [n for n in graph.names() if graph[n].role != "weight"]


def test_sites_see_the_tensors_they_name():
    model = build("vit_cls")
    graph = attach_sites(model)
    graph.set_mode("fp")
    seen = {}
    graph.set_tap(lambda site, x, y: seen.setdefault(site.name, tuple(y.shape)))
    with torch.no_grad():
        graph.model(torch.randn(2, 3, 32, 32))
    tokens, dim, heads = 17, 192, 3
    assert seen["blocks.0.attn.q"] == (2, heads, tokens, dim // heads)
    assert seen["blocks.0.attn.scores"] == (2, heads, tokens, tokens)
    assert seen["blocks.0.attn.softmax"] == (2, heads, tokens, tokens)
    assert seen["blocks.0.attn.sv"] == (2, tokens, dim)
    assert seen["blocks.0.mlp.act"] == (2, tokens, 4 * dim)
    assert seen["head.in"] == (2, dim)
    assert set(seen) == {n for n in graph.names() if graph[n].role != "weight"}
    assert list(seen) == [n for n in graph.names() if graph[n].role != "weight"]  # forward order


def test_non_vit_is_rejected():
    with pytest.raises(PipelineError, match="not a timm VisionTransformer"):
        attach_sites(timm.create_model("resnet10t", num_classes=10))
    with pytest.raises(PipelineError, match="not a timm VisionTransformer"):  # no blocks: nothing to quantize in them
        attach_sites(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=0))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(global_pool="map"), "attention pooling"),
        (dict(mlp_layer=GluMlp, act_layer="silu"), "MLP type GluMlp"),
        (dict(norm_layer="rmsnorm"), "norm type RmsNorm"),
        (dict(attn_layer="diff"), "attention type DiffAttention"),
        (dict(block_fn=ResPostBlock), "block type ResPostBlock"),  # every block another type: still named
    ],
)
def test_vit_parts_the_sites_do_not_cover_are_rejected_by_name(kwargs, named):
    # Each would otherwise leave tensors unquantized (the pool's MLP, a gated MLP's fc2 input, RmsNorm outputs) or crash.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1, **kwargs).eval()
    with pytest.raises(PipelineError, match=f"not supported here: .*{named}"):
        attach_sites(model)


def test_a_distilled_deit_with_fc_norm_keeps_both_head_inputs():
    # timm's distilled forward_head never runs fc_norm: its sites would see no data, and head.in is the token itself
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1, fc_norm=True).eval()
    graph = attach_sites(model)
    names = set(graph.names())
    assert {"head.in", "head_dist.in"} <= names and not {n for n in names if n.startswith("fc_norm")} and "fc_norm" not in graph.folds
    graph.set_mode("fp")
    seen: set[str] = set()
    graph.set_tap(lambda site, x, y: seen.add(site.name))
    with torch.no_grad():
        graph.model(torch.randn(2, 3, 32, 32))
    assert seen == {n for n in names if graph[n].role != "weight"}  # every activation site sees data


@pytest.mark.parametrize("pool", ["token", "max"])
def test_fc_norm_after_a_pool_that_keeps_the_grid_has_no_input_site(pool):
    # class-token or max pooling passes the last residual add's codes through: a site there would round them twice
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1, global_pool=pool, fc_norm=True).eval()
    graph = attach_sites(model)
    assert "fc_norm.in" not in graph.names() and "fc_norm" in graph.names() and "head.in" not in graph.names()
    avg = attach_sites(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1, global_pool="avg", fc_norm=True))
    assert avg["fc_norm.in"].role == "norm_in"  # an average leaves the grid: quantized again


def test_hybrid_vit_with_a_cnn_backbone_is_rejected_by_name():
    # its ResNet stem would stay FP32 and patch_embed.proj.in would see feature maps, not the image
    model = timm.create_model("vit_tiny_r_s16_p8_224", img_size=32, num_classes=10, depth=1).eval()
    with pytest.raises(PipelineError, match=r"not supported here: hybrid CNN backbone \(patch_embed.backbone\)"):
        attach_sites(model)


def test_qparams_bind_on_the_sites_device():
    """A graph moved to a device before its first bind (sensitivity and search on CUDA) gets its qparams there."""
    from pipeline.quant.recipe import SiteSpec
    from pipeline.quant.sites import Site

    site = Site("blocks.0.attn.sv", "sv_attn").to("meta")  # any device other than the calibration state's CPU
    site.bind(SiteSpec(bits=8), 8, torch.ones(4), torch.zeros(4, dtype=torch.int32))
    assert site.scale.device.type == "meta" and site.zero_point.device.type == "meta"


def test_every_site_has_its_documented_role():
    graph = attach_sites(build("vit_every_norm"))
    expected = {
        "patch_embed.proj.in": "linear_in", "patch_embed.norm.in": "norm_in", "patch_embed.norm": "norm_out",
        "norm_pre.in": "norm_in", "blocks.0.in": "norm_in", "fc_norm.in": "norm_in", "fc_norm": "norm_out",
        "blocks.1.norm1": "norm_out", "blocks.1.norm2": "norm_out", "blocks.1.attn.norm": "norm_out", "blocks.1.mlp.norm": "norm_out",
        "blocks.1.attn.q_norm.in": "qkv", "blocks.1.attn.k_norm.in": "qkv",
        "blocks.1.attn.q": "qkv", "blocks.1.attn.k": "qkv", "blocks.1.attn.v": "qkv", "blocks.1.attn.scores": "scores",
        "blocks.1.attn.softmax": "intSoft", "blocks.1.attn.sv": "sv_attn", "blocks.1.mlp.act": "mlp_act",
        "blocks.1.res1": "residual", "blocks.1.res2": "residual",
    }
    assert {n: graph[n].role for n in expected} == expected
    cls = attach_sites(build("vit_cls"))
    assert cls["norm"].role == "norm_out" and cls["head.in"].role == "head_in" and cls["blocks.0.in"].role == "norm_in"


def test_scores_site_sees_the_scaled_softmax_input():
    graph = attach_sites(build("vit_cls"))
    graph.set_mode("fp")
    seen = {}
    graph.set_tap(lambda site, x, y: seen.setdefault(site.name, (x, y)))
    with torch.no_grad():
        graph.model(torch.randn(2, 3, 32, 32))
    attn = graph.model.blocks[0].attn
    q, k = seen["blocks.0.attn.q"][1], seen["blocks.0.attn.k"][1]
    scores = seen["blocks.0.attn.scores"][1]
    torch.testing.assert_close(scores, (q * attn.scale) @ k.transpose(-2, -1))
    torch.testing.assert_close(scores.softmax(-1), seen["blocks.0.attn.softmax"][0])
