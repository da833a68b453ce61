"""Recipes: defaults -> roles -> site globs, with one clear error per mistake."""

from __future__ import annotations

import pytest
import timm
import torch

from pipeline.errors import PipelineError
from pipeline.quant.recipe import resolve_recipe
from pipeline.quant.sites import attach_sites
from tests.conftest import compose


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=12).eval()
    return attach_sites(model)


def recipe(name: str, *overrides: str, extra: dict | None = None):
    """A recipe from conf/quant with command-line overrides, plus a YAML-style overlay."""
    from omegaconf import OmegaConf, open_dict

    quant = compose([f"quant={name}", *overrides]).quant
    if extra:
        with open_dict(quant):
            quant = OmegaConf.merge(quant, extra)
    return quant


def test_recommended_resolves_roles_and_kinds(graph):
    specs = resolve_recipe(recipe("recommended"), graph)
    assert specs["blocks.0.attn.qkv.weight"].granularity == "per_channel" and specs["blocks.0.attn.qkv.weight"].symmetric
    assert specs["blocks.3.attn.sv"].granularity == "per_channel"
    assert specs["blocks.3.mlp.act"].granularity == "per_channel"
    assert specs["blocks.3.norm1"].granularity == "per_channel"
    assert specs["norm"].granularity == "per_tensor"  # final norm: no weight can absorb per-channel scales
    assert specs["blocks.3.attn.q"].observer == "percentile" and specs["blocks.3.attn.q"].warmup == 5
    assert specs["blocks.3.attn.sv"].observer == "omse" and specs["blocks.3.attn.sv"].loss == "l1"
    assert specs["blocks.3.attn.softmax"].quantizer == "log2"
    assert specs["blocks.3.res1"].granularity == "ptf" and specs["blocks.0.in"].granularity == "ptf"
    assert specs["blocks.3.res1"].ptf_frac_bits == 2 and specs["blocks.0.in"].ptf_frac_bits == 2
    assert specs["head.in"].granularity == "per_tensor"
    assert {s.bits for s in specs.values()} == {8}


def test_kind_wide_granularity_applies_where_hardware_can_run_it(graph):
    specs = resolve_recipe(recipe("naive", "quant.act.granularity=ptf", "quant.act.ptf_frac_bits=2"), graph)
    assert {n for n, s in specs.items() if s.granularity == "ptf"} == {n for n in specs if graph[n].role in ("residual", "norm_in")}
    assert {n for n, s in specs.items() if s.ptf_frac_bits == 2} == {n for n, s in specs.items() if s.granularity == "ptf"}
    specs = resolve_recipe(recipe("naive", "quant.act.granularity=per_channel"), graph)
    assert {n for n, s in specs.items() if s.granularity == "per_channel" and graph[n].role != "weight"} == set(graph.folds) | graph.channel_operands
    assert graph.channel_operands == {f"blocks.{i}.attn.v" for i in range(12)}  # q and k are reduced over their channels in q·kᵀ


def test_kind_width_overrides_change_whole_recipe(graph):
    specs = resolve_recipe(recipe("recommended", "quant.weight.bits=4", "quant.act.bits=6"), graph)
    assert {s.bits for n, s in specs.items() if graph[n].role == "weight"} == {4}
    assert {s.bits for n, s in specs.items() if graph[n].role != "weight"} == {6}


def test_any_role_can_be_overridden_from_the_command_line(graph):
    specs = resolve_recipe(recipe("naive", "quant.roles.qkv.bits=16", "quant.roles.sv_attn.observer=omse"), graph)  # roles naive.yaml does not list
    assert specs["blocks.2.attn.k"].bits == 16 and specs["blocks.2.attn.sv"].bits == 8
    assert specs["blocks.2.attn.sv"].observer == "omse" and specs["blocks.2.attn.q"].observer == "minmax"
    with pytest.raises(Exception, match="Could not override 'quant.roles.softmax.bits'"):  # Hydra's error, before any work
        recipe("naive", "quant.roles.softmax.bits=4")
    with pytest.raises(PipelineError, match="unknown role 'softmax'"):  # a plain mapping, from Python
        resolve_recipe({"enabled": True, "roles": {"softmax": {"bits": 4}}}, graph)


def test_site_globs_apply_last_and_in_order(graph):
    q = recipe("recommended", extra={"sites": {"blocks.1[01].*": {"bits": 16}, "blocks.11.attn.q": {"bits": 12}}})
    specs = resolve_recipe(q, graph)
    assert specs["blocks.10.mlp.act"].bits == 16 and specs["blocks.11.attn.qkv.weight"].bits == 16
    assert specs["blocks.11.attn.q"].bits == 12
    assert specs["blocks.1.mlp.act"].bits == 8 and specs["blocks.9.res1"].bits == 8


def test_disabled_recipe_disables_every_site(graph):
    specs = resolve_recipe(recipe("none"), graph)
    assert not any(s.enabled for s in specs.values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant.act.bits=17"], r"quant\.act\.bits=17 is outside 2\.\.16"),
        (["quant.weight.bits=1"], r"quant\.weight\.bits=1 is outside 2\.\.16"),
        (["quant.act.observer=minmaxx"], r"unknown observer 'minmaxx'"),
        (["quant.rounding=stochastic"], r"unknown rounding 'stochastic'"),
        ({"sites": {"blocks.99.*": {"bits": 16}}}, r"glob 'blocks\.99\.\*' matches no site"),
        ({"sites": {"blocks.0.res1": {"granularity": "per_channel"}}}, r"blocks\.0\.res1 \(residual\): per-channel activation scales must fold"),
        ({"sites": {"blocks.0.attn.sv": {"granularity": "ptf"}}}, r"blocks\.0\.attn\.sv \(sv_attn\): granularity ptf .* roles residual, norm_in"),
        ({"roles": {"residual": {"ptf_shift": 0}}}, r"quant\.roles\.residual\.ptf_shift=0 is outside 1\.\.8"),
        ({"roles": {"residual": {"ptf_frac_bits": 5}}}, r"quant\.roles\.residual\.ptf_frac_bits=5 is outside 0\.\.4"),
        ({"sites": {"blocks.0.res1": {"granularity": "per_tensor", "ptf_frac_bits": 2}}}, r"site blocks\.0\.res1: ptf_frac_bits=2 .* needs granularity ptf"),
        (["quant.act.granularity=per_row"], r"unknown granularity 'per_row'"),
        ({"sites": {"blocks.0.attn.q": {"quantizer": "log2"}}}, r"only for the softmax output"),
        ({"sites": {"blocks.0.attn.k": {"granularity": "per_channel"}}}, r"blocks\.0\.attn\.k \(qkv\): per-channel .* or be a matmul's output channels \(v"),
        ({"roles": {"intSoft": {"frac_bits": 5}}}, r"quant\.roles\.intSoft\.frac_bits=5 is outside 0\.\.4"),
        ({"roles": {"intSoft": {"quantizer": "int_softmax", "frac_bits": 1}}}, r"frac_bits=1 needs quantizer log2"),
        (["quant.act.gptq=true"], r"gptq is a weight rounding .* not for role"),
        (["quant.weight.bias_bits=4"], r"quant\.weight\.bias_bits=4 must be 0 \(float bias\) or in 8\.\.32"),
        (["quant.roles.mlp_act.bias_bits=16"], r"blocks\.0\.mlp\.act: bias_bits sets a layer's bias with its weight"),
        (["quant.roles.residual.samples=0"], r"quant\.roles\.residual\.samples=0 must be an integer >= 1"),
        (["quant.roles.scores.samples=64"], r"blocks\.0\.attn\.scores: samples=64 sets the omse range search's sample; observer 'percentile' keeps none"),
        (["quant.act.alpha=1.5"], r"quant\.act \(observer percentile\): alpha must be in \(0\.5, 1\], got 1\.5"),
        (["quant.act.sigma=0"], r"quant\.act \(observer percentile\): sigma must be in \(0, 1\]"),
        (["quant.act.warmup=0"], r"quant\.act \(observer percentile\): warmup must be an integer >= 1"),
        (["quant.roles.residual.huber_delta=-1"], r"quant\.roles\.residual \(observer omse\): huber_delta must be > 0"),
    ],
)
def test_bad_recipes_fail_with_one_clear_message(graph, overrides, message):
    args, extra = (overrides, None) if isinstance(overrides, list) else ([], overrides)
    with pytest.raises(PipelineError, match=message):
        resolve_recipe(recipe("recommended", *args, extra=extra), graph)

def test_role_settings_are_checked_where_the_model_has_no_such_site():
    from tests.test_sites import build

    gap = attach_sites(build("vit_gap"))  # fc_norm emits the head input: no head_in site
    assert not gap.names("head_in")
    for override, message in (("quant.roles.head_in.bits=99", r"quant\.roles\.head_in\.bits=99 is outside 2\.\.16"), ("quant.roles.head_in.observer=bogus", r"unknown observer 'bogus'")):
        with pytest.raises(PipelineError, match=message):
            resolve_recipe(recipe("recommended", override), gap)


def test_recipe_file_can_extend_another_with_globs(graph):
    specs = resolve_recipe(recipe("recommended_tail16"), graph)
    assert specs["blocks.11.mlp.act"].bits == 16 and specs["blocks.10.attn.q"].bits == 16
    assert specs["blocks.9.mlp.act"].bits == 8 and specs["blocks.11.mlp.act"].granularity == "per_channel"


def test_samples_sets_the_omse_sample_size_of_the_sites_it_reaches(graph):
    from pipeline.quant.observers import build_observer

    specs = resolve_recipe(recipe("recommended", "quant.roles.residual.samples=7"), graph)
    res, sv = specs["blocks.0.res1"], specs["blocks.0.attn.sv"]
    assert res.samples == 7 and sv.samples is None
    assert res.calibration_key()["samples"] == 7 and "samples" not in sv.calibration_key()  # unset: old calibration states still match
    observer = build_observer(res.observer, granularity=res.observer_granularity, axis=-1, **res.observer_kwargs())
    observer(torch.randn(4, 5, 3))
    assert observer.samples.shape == (3, 7)  # 7 values kept per channel, of the 20 seen
    default = build_observer(sv.observer, granularity=sv.observer_granularity, axis=-1, **sv.observer_kwargs())
    default(torch.randn(40, 50, 3))
    assert default.samples.shape == (3, 512)


def test_recipe_rounding_reaches_every_site(graph):
    specs = resolve_recipe(recipe("recommended", "quant.rounding=half_even"), graph)
    assert {s.rounding for s in specs.values()} == {"half_even"}


def test_symmetric_implies_signed_unless_said(graph):
    specs = resolve_recipe(recipe("naive", extra={"roles": {"scores": {"symmetric": True}}}), graph)
    assert specs["blocks.0.attn.scores"].symmetric and specs["blocks.0.attn.scores"].signed


def test_a_log2_softmax_must_reach_even_attention(graph):
    # recommended's frac_bits 3 at 4 bits keeps only p >= 2^-15/8 = 0.27: every row of 65 tokens would be zeros
    with pytest.raises(PipelineError, match=r"blocks.0.attn.softmax: log2 at 4 bits with frac_bits=3 .* above 1/17 .*: set frac_bits=1"):
        resolve_recipe(recipe("recommended", "quant.act.bits=4"), graph)
    specs = resolve_recipe(recipe("recommended", "quant.act.bits=4", "quant.roles.intSoft.frac_bits=1"), graph)
    assert specs["blocks.0.attn.softmax"].bits == 4
    with pytest.raises(PipelineError, match="log2 at 2 bits with frac_bits=0 .*: raise bits"):
        resolve_recipe(recipe("recommended", "quant.roles.intSoft.bits=2", "quant.roles.intSoft.frac_bits=0"), graph)


def test_a_disabled_recipe_checks_its_settings_and_says_it_ignores_them(graph, caplog):
    from pipeline.quant.recipe import check_disabled_recipe

    for check in (lambda quant: resolve_recipe(quant, graph), check_disabled_recipe):
        with pytest.raises(PipelineError, match=r"quant.act.bits=17 is outside 2..16"):
            check(recipe("none", "quant.act.bits=17"))
    specs = resolve_recipe(recipe("none", "quant.act.bits=6"), graph)
    assert not any(spec.enabled for spec in specs.values())
    with caplog.at_level("WARNING"):
        check_disabled_recipe(recipe("none", "quant.act.bits=6"))
    assert "quant=none quantizes nothing: quant.act ignored" in caplog.text

