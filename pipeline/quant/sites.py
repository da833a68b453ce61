"""Quantization sites of a timm ViT: every point where an integer NPU quantizes.

`attach_sites(model)` deep-copies a timm VisionTransformer (or DeiT) and adds a
`Site` at every such point, named after timm's module paths:

| site name                     | role       | tensor                                   |
|-------------------------------|------------|------------------------------------------|
| `<linear or conv>.weight`     | weight     | patch_embed.proj, qkv, proj, fc1, fc2, head |
| `patch_embed.proj.in`         | linear_in  | the input image                          |
| `blocks.0.in`                 | norm_in    | embeddings + pos_embed (block 0's norm1 input; after norm_pre where there is one) |
| `blocks.i.norm1`, `blocks.i.norm2`, `norm`, `fc_norm` | norm_out | LayerNorm outputs (qkv / fc1 / head inputs) |
| `blocks.i.attn.q`, `.k`       | qkv        | (B, H, N, D)                             |
| `blocks.i.attn.v`             | qkv        | (B, N, C), before the head split         |
| `blocks.i.attn.scores`        | scores     | q·kᵀ·scale, the softmax input (B, H, N, N) |
| `blocks.i.attn.softmax`       | intSoft    | softmax output (B, H, N, N)              |
| `blocks.i.attn.sv`            | sv_attn    | attention·V, (B, N, C): the proj input   |
| `blocks.i.mlp.act`            | mlp_act    | GELU output (B, N, 4C): the fc2 input    |
| `blocks.i.res1`, `.res2`      | residual   | both residual adds (= norm2 input, next norm1 input) |
| `head.in` (`head_dist.in`)    | head_in    | the classifier input after pooling (none where fc_norm emits it) |

Where the model has them, the optional LayerNorms get sites too:
| `patch_embed.norm.in`, `patch_embed.norm` | norm_in, norm_out | `embed_norm_layer`: the patch conv's output and its norm |
| `norm_pre.in`                 | norm_in    | `pre_norm`: the embeddings before norm_pre (its output is `blocks.0.in`) |
| `blocks.i.attn.q_norm.in`, `.k_norm.in` | qkv | `qk_norm`: q and k as qkv emits them (B, H, N, D) |
| `blocks.i.attn.norm`, `blocks.i.mlp.norm` | norm_out | `scale_attn_norm` / `scale_mlp_norm`: the proj / fc2 inputs |
| `fc_norm.in`                  | norm_in    | global average pooling with fc_norm: the pooled tokens |

Rule: a module's output site is named by its path, an input site `<path>.in`,
a weight site `<path>.weight`.

In a pre-norm ViT every LayerNorm input is a residual-stream tensor; each tensor
is quantized once, where it is produced, as the NPU stores it. Linear outputs
that the NPU fuses are not separate sites: qkv's output is q/k/v, fc1 fuses
with GELU (`mlp_act`), proj and fc2 fuse into the residual add. One tensor is
re-quantized: with class-token pooling `head.in` is the class token's row of the
final norm's output, rounded again on a grid calibrated on that token alone.

Attention, Block, Linear and Conv2d modules of the copy are re-classed to the
subclasses below, which only add sites; LayerNorm and GELU outputs get their
site through a forward hook (torch.ao's eager-mode pattern). With every site
`off`, each subclass calls timm's own forward, so the logits are bit-identical
to the plain timm model's.
"""

from __future__ import annotations

import copy
import re
import types
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError

ROLES = ("weight", "linear_in", "norm_in", "norm_out", "qkv", "scores", "intSoft", "sv_attn", "mlp_act", "residual", "head_in")
MODES = ("off", "fp", "observe", "quant")
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.")

Tap = Callable[["Site", torch.Tensor, torch.Tensor], None]


class Site(nn.Module):
    """One quantization point.

    Modes: `off` (timm's own path, no site code runs), `fp` (explicit path, identity),
    `observe` (the observer records the FP32 tensor; the output is the input),
    `quant` (fake-quantize with the bound qparams). An optional `tap(site, x, y)`
    sees the site's input and output (profiling, dumps); a tap with an `on_rounded(site, x, rounded)`
    method also sees, in `quant` mode, the pre-clamp rounded codes (see `fake_quant`).
    """

    def __init__(self, name: str, role: str, axis: int = -1):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown site role '{role}'")
        self.name, self.role, self.axis = name, role, axis
        self.mode = "off"
        self.spec = None  # pipeline.quant.recipe.SiteSpec, bound when quantizing
        self.observer: nn.Module | None = None
        self.tap: Tap | None = None
        self.bits = 0
        self.qmin = self.qmax = 0
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("zero_point", None, persistent=False)
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)  # moves with .to(): the device qparams bind to

    @property
    def block(self) -> int | None:
        """Block index parsed from the name (`blocks.3.attn.sv` -> 3), None outside blocks."""
        m = _BLOCK_RE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def per_channel(self) -> bool:
        """True when the bound scale has one entry per channel (per_channel or ptf)."""
        return self.scale is not None and self.scale.numel() > 1

    @property
    def granularity(self) -> str:
        """The bound qparams' granularity: per_tensor, per_channel or ptf (power-of-two channel factors)."""
        if not self.per_channel:
            return "per_tensor"
        return "ptf" if self.spec is not None and self.spec.granularity == "ptf" else "per_channel"

    def bind(self, spec, bits: int, scale: torch.Tensor | None, zero_point: torch.Tensor | None) -> None:
        """Bind qparams for `quant` mode (uniform: scale/zero_point; log2 and int_softmax: none)."""
        from pipeline.quant.quantizers import qrange

        self.spec, self.bits = spec, bits
        if spec.quantizer == "uniform":
            self.qmin, self.qmax = qrange(bits, spec.signed)
            self.scale = scale.to(self.device_anchor.device, torch.float32)
            self.zero_point = zero_point.to(self.device_anchor.device, torch.float32)
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
            self.scale = self.zero_point = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            y = self.fake_quant(x, getattr(self.tap, "on_rounded", None))
        else:
            if self.mode == "observe":
                self._observe(x)
            y = x
        if self.tap is not None:
            self.tap(self, x, y)
        return y

    def fake_quant(self, x: torch.Tensor, on_rounded: Callable[["Site", torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """x fake-quantized with the bound qparams (x's shape and dtype).

        `on_rounded(site, x, rounded)`, when given, is called with the pre-clamp rounded values
        (uniform: round_to_int(x / scale); log2: round_to_int(-log2 x); float32, x's shape) before
        they are turned into the output in place: it may read them (the profiler counts codes without
        a second rounding pass) and clamp them in place to any range that contains
        [qmin - zp, qmax - zp] (log2: [0, qmax + 1]), which leaves the output unchanged.
        """
        from pipeline.quant.quantizers import broadcast_qparams, dequantize_rounded_, log2_dequantize_rounded_, rounded_log2, rounded_quotient

        if self.spec.quantizer == "uniform":
            scale, zero_point = broadcast_qparams(x, self.scale, self.zero_point, self.axis if self.per_channel else None)
            rounded = rounded_quotient(x, scale, self.spec.rounding)
            if on_rounded is not None:
                on_rounded(self, x, rounded)
            return dequantize_rounded_(rounded, scale, zero_point, self.qmin, self.qmax).to(x.dtype)
        rounded = rounded_log2(x, self.spec.rounding, self.spec.frac_bits)
        if on_rounded is not None:
            on_rounded(self, x, rounded)
        return log2_dequantize_rounded_(rounded, self.bits, self.spec.frac_bits).to(x.dtype if x.is_floating_point() else torch.float32)

    def _observe(self, x: torch.Tensor) -> None:
        from pipeline.quant.observers import NonFiniteError

        if self.observer is None:
            return
        try:
            self.observer(x.detach())
        except NonFiniteError:
            what = "the model's weight holds" if self.role == "weight" else "calibration data produce"
            raise PipelineError(f"{what} NaN or Inf at site {self.name}") from None

    def extra_repr(self) -> str:
        return f"name={self.name}, role={self.role}, mode={self.mode}, bits={self.bits}"


class _SiteOwner:
    """Mixin for re-classed timm modules: run the explicit path only when a site is live."""

    _own_sites: tuple[Site, ...] = ()

    @property
    def sites_live(self) -> bool:
        return any(s.mode != "off" for s in self._own_sites)


class QuantLinear(nn.Linear, _SiteOwner):
    """nn.Linear with a weight site and, for the head, an input site.

    In `quant` mode the layer uses `qweight`, the effective weight of the NPU:
    Q(W·diag(s))·diag(1/s) when the producing activation site has per-channel
    scales s (folded into the weight columns), else Q(W).
    """

    weight_site: Site
    in_site: Site | None

    def _init_sites(self, name: str, in_role: str | None) -> None:
        self.weight_site = Site(f"{name}.weight", "weight", axis=0)
        channel_axis = 1 if isinstance(self, nn.Conv2d) else -1  # (B, C, H, W) images, (..., C) tokens
        self.in_site = Site(f"{name}.in", in_role, axis=channel_axis) if in_role else None
        self._own_sites = tuple(s for s in (self.weight_site, self.in_site) if s is not None)
        self.register_buffer("qweight", None, persistent=False)
        # Set by SiteGraph (plain attributes, not submodules): the site that quantizes this layer's input
        # and the LayerScale whose gamma is folded into its rows; they define the accumulator's step.
        self.__dict__["input_site"] = self.in_site
        self.__dict__["layer_scale"] = None

    def effective_weight(self) -> torch.Tensor:
        return self.qweight if self.weight_site.mode == "quant" else self.weight

    def accumulator_step(self) -> torch.Tensor | None:
        """The step of the integer accumulator in output units, (C_out,) or a scalar, float32.

        The NPU sums codes: weight codes (step s_w per stored row) times input codes (x_q - z), whose
        step is the input site's per-tensor scale s_x, or 1 where the input's per-channel scales are
        folded into the weight. Step = s_w · s_x (s_w · 1 when folded), in the stored weight's rows
        (a LayerScale gamma folded in). None unless the weight and its input are both quantized on a
        uniform grid: then there is no integer accumulator and the bias stays float.
        """
        weight, source = self.weight_site, self.input_site
        if weight.mode != "quant" or weight.scale is None or source is None or source.mode != "quant" or source.scale is None:
            return None
        return weight.scale if source.per_channel else weight.scale * source.scale.reshape(())

    def bias_codes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(codes, step): the bias as the NPU stores it, on the accumulator's grid (`accumulator_step`).

        codes = clamp(round(gamma · b / step), -2^(n-1), 2^(n-1) - 1), n = the weight spec's `bias_bits`,
        with the weight's rounding mode; int64 (C_out,); step float64 (C_out,). The stored rows carry a
        folded LayerScale gamma, so the stored bias is gamma · b. None when the layer has no bias, the
        spec asks for a float bias (`bias_bits: 0`) or there is no integer accumulator.
        """
        step = self.accumulator_step()
        if self.bias is None or step is None or not self.weight_site.spec.bias_bits:
            return None
        stored = self.bias.detach().double()
        if self.layer_scale is not None:
            stored = stored * self.layer_scale.gamma.detach().double()
        step = step.double().expand_as(stored)
        return accumulator_codes(stored, step, self.weight_site.spec), step

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the layer adds: the integer bias (`bias_codes`) dequantized back to the output's own
        units while the layer runs on an integer accumulator, else the float bias."""
        integer = self.bias_codes()
        if integer is None:
            return self.bias
        codes, step = integer
        gamma = None if self.layer_scale is None else self.layer_scale.gamma.detach().double()
        return divide_by_storage_factor(codes.double() * step, gamma).to(self.bias.dtype)  # back from the stored rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_site is not None:
            x = self.in_site(x)
        return F.linear(x, self.effective_weight(), self.effective_bias())


def accumulator_codes(values: torch.Tensor, step: torch.Tensor, spec) -> torch.Tensor:
    """`values` (float64) as integers on an accumulator of step `step` (broadcast to them), as the NPU
    stores a bias: clamp(round(values / step), -2^(n-1), 2^(n-1) - 1), n = the weight spec's `bias_bits`,
    in its rounding mode; int64."""
    from pipeline.quant.quantizers import round_to_int

    limit = 2 ** (spec.bias_bits - 1)
    return round_to_int(values / step, spec.rounding).clamp_(-limit, limit - 1).to(torch.int64)


class QuantConv2d(nn.Conv2d, _SiteOwner):
    """nn.Conv2d (patch embedding) with a weight site and an input site."""

    _init_sites = QuantLinear._init_sites
    effective_weight = QuantLinear.effective_weight
    accumulator_step = QuantLinear.accumulator_step
    bias_codes = QuantLinear.bias_codes
    effective_bias = QuantLinear.effective_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_site is not None:
            x = self.in_site(x)
        return self._conv_forward(x, self.effective_weight(), self.effective_bias())


def _attention_classes() -> tuple[type, type]:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    return Attention, Block


def _make_quant_attention():
    from timm.layers import Attention
    from timm.layers import maybe_add_mask, resolve_self_attn_mask

    class QuantAttention(Attention, _SiteOwner):
        """timm Attention with explicit q, k, v, scores, softmax (intSoft) and sv sites."""

        def _init_sites(self, name: str) -> None:
            self.q_site = Site(f"{name}.q", "qkv")
            self.k_site = Site(f"{name}.k", "qkv")
            self.v_site = Site(f"{name}.v", "qkv")
            self.scores_site = Site(f"{name}.scores", "scores")
            self.softmax_site = Site(f"{name}.softmax", "intSoft")
            self.sv_site = Site(f"{name}.sv", "sv_attn")
            # qk_norm: q and k as qkv emits them are a LayerNorm's input, stored before it (B, H, N, D)
            self.q_in_site = Site(f"{name}.q_norm.in", "qkv") if isinstance(self.q_norm, nn.LayerNorm) else None
            self.k_in_site = Site(f"{name}.k_norm.in", "qkv") if isinstance(self.k_norm, nn.LayerNorm) else None
            sites = (self.q_in_site, self.q_site, self.k_in_site, self.k_site, self.v_site, self.scores_site, self.softmax_site, self.sv_site)
            self._own_sites = tuple(site for site in sites if site is not None)

        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
            if not self.sites_live:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads * self.head_dim).unbind(2)
            heads = lambda t: t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731  (B, H, N, D)
            q = self.q_site(self.q_norm(_maybe(self.q_in_site, heads(q))))
            k = self.k_site(self.k_norm(_maybe(self.k_in_site, heads(k))))
            v = heads(self.v_site(v))  # v's site sees (B, N, C): its channels are attention x V's output channels
            scores = self.scores_site((q * self.scale) @ k.transpose(-2, -1))
            scores = maybe_add_mask(scores, resolve_self_attn_mask(N, scores, attn_mask, is_causal))
            attn = self.attn_drop(self._softmax(scores))
            x = self.sv_site((attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim))
            x = self.norm(x)
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

        def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
            site = self.softmax_site
            if site.mode == "quant" and site.spec.quantizer == "int_softmax":
                from pipeline.quant.intsoftmax import int_softmax_fake

                if self.scores_site.mode != "quant" or self.scores_site.per_channel:
                    raise PipelineError(f"{site.name}: int_softmax needs per-tensor quantized scores at {self.scores_site.name}")
                y = int_softmax_fake(scores, float(self.scores_site.scale), site.bits, dim=-1)
                if site.tap is not None:
                    site.tap(site, scores.softmax(dim=-1), y)
                return y
            return site(scores.softmax(dim=-1))

    return QuantAttention


def _make_quant_block():
    from timm.models.vision_transformer import Block

    class QuantBlock(Block, _SiteOwner):
        """timm Block with sites on both residual adds."""

        def _init_sites(self, name: str) -> None:
            self.res1_site = Site(f"{name}.res1", "residual")
            self.res2_site = Site(f"{name}.res2", "residual")
            self._own_sites = (self.res1_site, self.res2_site)

        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
            if not self.sites_live:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            x = self.res1_site(x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))))
            return self.res2_site(x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))

    return QuantBlock


QuantAttention = _make_quant_attention()
QuantBlock = _make_quant_block()


def _maybe(site: Site | None, x: torch.Tensor) -> torch.Tensor:
    """x through `site`, or x itself where the model has no such site."""
    return x if site is None else site(x)


def _output_site_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.out_site(output)


def _input_site_pre_hook(module: nn.Module, args):
    return (module.in_site(args[0]), *args[1:])


class SiteGraph:
    """The quantized copy of a model and its sites, in forward order.

    `folds` maps a per-channel-capable activation site to the module whose weight
    columns absorb its channel scales (e.g. `blocks.0.attn.sv` -> `blocks.0.attn.proj`).
    `channel_operands` are activation sites whose channels are a matmul's output channels
    (v in attention x V): like a weight's per-output-channel scales, theirs go into the
    accumulator's per-channel requantization, with no fold.
    """

    def __init__(self, model: nn.Module, sites: dict[str, Site], folds: dict[str, str]):
        self.model = model
        self.sites = sites
        self.folds = folds
        self.consumers = {consumer: producer for producer, consumer in folds.items()}
        self.channel_operands = {m.v_site.name for m in model.modules() if isinstance(getattr(m, "v_site", None), Site)}
        self.layer_scales = _layer_scales(model)
        for path, module in model.named_modules():
            if isinstance(module, (QuantLinear, QuantConv2d)):
                producer = self.consumers.get(path)
                if module.in_site is None and producer is not None:
                    module.__dict__["input_site"] = sites[producer]
                if path in self.layer_scales:
                    module.__dict__["layer_scale"] = model.get_submodule(self.layer_scales[path])

    def output_scale(self, consumer: str) -> torch.Tensor | None:
        """The LayerScale gamma (C_out,) that multiplies module `consumer`'s output channels (DeiT III's
        `init_values`: attn.proj -> ls1, mlp.fc2 -> ls2), else None. An NPU folds it into the weight's rows."""
        path = self.layer_scales.get(consumer)
        return None if path is None else self.model.get_submodule(path).gamma

    def fold_scale(self, consumer: str) -> torch.Tensor | None:
        """The per-channel scales (C,) that module `consumer`'s weight absorbs now: its producer's, when that
        site is quantized per channel (per_channel or ptf); None when nothing folds."""
        producer = self.consumers.get(consumer)
        site = self.sites.get(producer) if producer else None
        return site.scale if site is not None and site.mode == "quant" and site.per_channel else None

    def per_channel_ok(self, name: str) -> bool:
        """Whether integer hardware can run per-channel scales at this site (weights, folds, channel operands)."""
        return self.sites[name].role == "weight" or name in self.folds or name in self.channel_operands

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, name: str) -> Site:
        if name not in self.sites:
            raise PipelineError(f"unknown site '{name}'")
        return self.sites[name]

    def names(self, role: str | None = None) -> list[str]:
        return [n for n, s in self.sites.items() if role is None or s.role == role]

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def set_mode(self, mode: str, names: list[str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown site mode '{mode}'")
        for name in names if names is not None else self.sites:
            self.sites[name].mode = mode

    def set_tap(self, tap: Tap | None, names: list[str] | None = None) -> None:
        for name in names if names is not None else self.sites:
            self.sites[name].tap = tap

    def to(self, device: torch.device) -> "SiteGraph":
        self.model.to(device)
        return self


def attach_sites(model: nn.Module) -> SiteGraph:
    """Deep-copy a timm ViT and add a site at every NPU quantization point."""
    Attention, Block = _attention_classes()
    from timm.models.vision_transformer import VisionTransformer

    # a VisionTransformer with other block types goes on, so that _unsupported_parts names them
    blocks = getattr(model, "blocks", ())
    if not len(blocks) or (not isinstance(model, VisionTransformer) and not any(type(b) is Block for b in blocks)):
        raise PipelineError(f"{type(model).__name__} is not a timm VisionTransformer with Block modules; quant sites need a ViT/DeiT")
    unsupported = _unsupported_parts(model, Attention, Block)
    if unsupported:
        raise PipelineError(f"{type(model).__name__}: quant sites cover timm ViT/DeiT blocks (Attention, Mlp, LayerNorm); not supported here: {'; '.join(unsupported)}")
    qmodel = copy.deepcopy(model).eval()
    # the head's input is its own site unless fc_norm produces it: that LayerNorm output folds into the head
    # (a distilled DeiT's forward_head takes the two tokens straight to its heads and never runs fc_norm)
    distilled = getattr(qmodel, "head_dist", None) is not None
    fc_norm_runs = isinstance(getattr(qmodel, "fc_norm", None), nn.LayerNorm) and not distilled
    head_inputs = {"head_dist"} | (set() if fc_norm_runs else {"head"})
    for name, module in list(qmodel.named_modules()):
        if type(module) is nn.Conv2d:
            module.__class__ = QuantConv2d
            module._init_sites(name, "linear_in" if name == "patch_embed.proj" else None)
        elif type(module) is nn.Linear:
            module.__class__ = QuantLinear
            module._init_sites(name, "head_in" if name in head_inputs else None)
        elif type(module) is Attention:
            module.__class__ = QuantAttention
            module._init_sites(name)
        elif type(module) is Block:
            module.__class__ = QuantBlock
            module._init_sites(name)
        elif isinstance(module, nn.LayerNorm) and not name.endswith(("q_norm", "k_norm")) and (name != "fc_norm" or fc_norm_runs):
            _add_layer_norm_sites(module, name, input_site=name in LAYER_NORM_INPUTS and not (name == "fc_norm" and _pool_keeps_grid(qmodel)))
        elif re.fullmatch(r"blocks\.\d+\.mlp\.act", name) and not isinstance(module, nn.Identity):
            _add_output_site(module, name, "mlp_act")
    if getattr(qmodel, "pos_embed", None) is not None:
        qmodel._pos_embed = types.MethodType(_pos_embed_on_accumulator, qmodel)  # the instance's, not timm's class
    qmodel.blocks[0].in_site = Site("blocks.0.in", "norm_in")
    qmodel.blocks[0].register_forward_pre_hook(_input_site_pre_hook)
    sites = {s.name: s for s in _forward_order(qmodel)}
    return SiteGraph(qmodel, sites, _fold_pairs(qmodel, sites))


def position_codes(qmodel: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes, step): the patch tokens' position embedding as the NPU adds it, a second integer bias on
    the patch conv's accumulator (one per position and channel) beside the conv's own (`bias_codes`).

    codes = clamp(round(pos / step), -2^(n-1), 2^(n-1) - 1), n = the conv weight spec's `bias_bits`, in its
    rounding mode; int64 (1, N_patches, C); step float64 (C,) = the conv's `accumulator_step`. The prefix
    tokens' rows (class, distillation, register tokens) are constants, quantized once at `blocks.0.in`.
    None where timm's add is not on that accumulator: no integer accumulator or `bias_bits: 0` (the
    embedding stays float, like the bias), a LayerNorm between the conv and the add (`embed_norm_layer`),
    or an embedding resampled per input size (`dynamic_img_size`).
    """
    conv, norm = qmodel.patch_embed.proj, getattr(qmodel.patch_embed, "norm", None)
    step = conv.accumulator_step() if isinstance(conv, QuantConv2d) else None
    if step is None or not conv.weight_site.spec.bias_bits or qmodel.pos_embed is None or qmodel.dynamic_img_size or not isinstance(norm, (nn.Identity, type(None))):
        return None
    prefix = 0 if qmodel.no_embed_class else qmodel.num_prefix_tokens
    patches = qmodel.pos_embed.detach()[:, prefix:].double()
    step = step.double().expand(patches.shape[-1])
    return accumulator_codes(patches, step, conv.weight_site.spec), step


def _pos_embed_on_accumulator(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's own `_pos_embed`, run with the patch rows of `pos_embed` on the patch conv's integer
    accumulator (`position_codes`) while that conv runs on one; timm's float embedding otherwise."""
    integer = position_codes(self)
    if integer is None:
        return type(self)._pos_embed(self, x)
    codes, step = integer
    original = self.pos_embed
    prefix = original.shape[1] - codes.shape[1]
    self._parameters["pos_embed"] = torch.cat([original[:, :prefix], (codes.double() * step).to(original.dtype)], dim=1)
    try:
        return type(self)._pos_embed(self, x)
    finally:
        self._parameters["pos_embed"] = original


def _unsupported_parts(model: nn.Module, Attention: type, Block: type) -> list[str]:
    """Parts of a timm ViT that the site pass would leave unquantized or fold wrongly (one entry per kind).

    Attention pooling, attention variants and output gates, gated MLPs (no single GELU output feeding
    fc2) and norms other than LayerNorm (RmsNorm: the norm sites and their folds are LayerNorm's).
    """
    from timm.layers import Mlp

    found: dict[str, None] = {}  # ordered set
    if getattr(getattr(model, "patch_embed", None), "backbone", None) is not None:
        found["hybrid CNN backbone (patch_embed.backbone)"] = None
    if getattr(model, "attn_pool", None) is not None:
        found["attention pooling (global_pool='map')"] = None
    for block in model.blocks:
        if type(block) is not Block:
            found[f"block type {type(block).__name__}"] = None
            continue
        if type(block.attn) is not Attention:
            found[f"attention type {type(block.attn).__name__}"] = None
        elif getattr(block.attn, "gate", None) is not None:
            found["gated attention output"] = None
        if type(block.mlp) is not Mlp:
            found[f"MLP type {type(block.mlp).__name__}"] = None
        for norm in (block.norm1, block.norm2):
            if not isinstance(norm, nn.LayerNorm):
                found[f"norm type {type(norm).__name__}"] = None
    for path in ("norm", "fc_norm", "norm_pre"):
        norm = getattr(model, path, None)
        if norm is not None and not isinstance(norm, (nn.LayerNorm, nn.Identity)):
            found[f"{path} type {type(norm).__name__}"] = None
    return list(found)


def _add_output_site(module: nn.Module, name: str, role: str) -> None:
    module.out_site = Site(name, role)
    module.register_forward_hook(_output_site_hook)


def _add_input_site(module: nn.Module, name: str, role: str) -> None:
    module.in_site = Site(name, role)
    module.register_forward_pre_hook(_input_site_pre_hook)


LAYER_NORM_INPUTS = {"patch_embed.norm": "norm_in", "norm_pre": "norm_in", "fc_norm": "norm_in"}
"""LayerNorms outside the blocks whose input is not already a site's output -> the role of their input site:
the patch embedding's conv output (`embed_norm_layer`), the embeddings before `norm_pre` (`pre_norm`),
the pooled tokens before `fc_norm` (global average pooling; with class-token or max pooling the pooled
values are the last residual add's codes, so `fc_norm` gets no input site)."""


def _pool_keeps_grid(model: nn.Module) -> bool:
    """True when the pooling before `fc_norm` passes values of the last residual add through unchanged
    (class token, per-channel max, or none), so they are already on that site's grid; an average leaves it."""
    return getattr(model, "global_pool", "avg") in ("token", "max", "")


def _add_layer_norm_sites(module: nn.LayerNorm, name: str, input_site: bool) -> None:
    """A LayerNorm's sites: its output (norm_out), and its input (`input_site`) where no other site quantizes it.

    `norm_pre` has no output site: its output is block 0's input, the site `blocks.0.in`.
    """
    if input_site:
        _add_input_site(module, f"{name}.in", LAYER_NORM_INPUTS[name])
    if name != "norm_pre":
        _add_output_site(module, name, "norm_out")


def _forward_order(qmodel: nn.Module) -> list[Site]:
    """Sites in the order the forward pass meets them; any extra site goes last."""

    def get(path: str, attr: str) -> list[Site]:
        try:
            site = getattr(qmodel.get_submodule(path), attr, None)
        except AttributeError:
            return []
        return [site] if isinstance(site, Site) else []

    order = get("patch_embed.proj", "in_site") + get("patch_embed.proj", "weight_site")
    order += get("patch_embed.norm", "in_site") + get("patch_embed.norm", "out_site") + get("norm_pre", "in_site")
    order += get("blocks.0", "in_site")
    for i, blk in enumerate(qmodel.blocks):
        p = f"blocks.{i}"
        order += get(f"{p}.norm1", "out_site") + get(f"{p}.attn.qkv", "weight_site")
        order += list(getattr(blk.attn, "_own_sites", ())) + get(f"{p}.attn.norm", "out_site") + get(f"{p}.attn.proj", "weight_site")
        order += get(p, "res1_site") + get(f"{p}.norm2", "out_site") + get(f"{p}.mlp.fc1", "weight_site")
        order += get(f"{p}.mlp.act", "out_site") + get(f"{p}.mlp.norm", "out_site") + get(f"{p}.mlp.fc2", "weight_site") + get(p, "res2_site")
    for path in ("norm", "fc_norm", "head", "head_dist"):
        order += get(path, "in_site") + get(path, "out_site") + get(path, "weight_site")
    seen = {id(s) for s in order}
    return order + [m for m in qmodel.modules() if isinstance(m, Site) and id(m) not in seen]


def _layer_scales(model: nn.Module) -> dict[str, str]:
    """Linear module path -> the LayerScale module that scales its output (blocks with `init_values`)."""
    from timm.layers import LayerScale

    found = {}
    for i, block in enumerate(getattr(model, "blocks", ())):
        for consumer, scale in ((f"blocks.{i}.attn.proj", "ls1"), (f"blocks.{i}.mlp.fc2", "ls2")):
            if isinstance(getattr(block, scale, None), LayerScale):
                found[consumer] = f"blocks.{i}.{scale}"
    return found


def stored_weight(graph: "SiteGraph", path: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight an NPU stores for module `path`: diag(gamma) · W · diag(s), the tensor that is quantized.

    s: the producer's per-channel activation scales folded into the input channels (`fold_scale`);
    gamma: a following LayerScale folded into the output channels (`output_scale`).
    """
    factor = storage_factor(weight, graph.fold_scale(path), graph.output_scale(path))
    return weight if factor is None else weight * factor


def storage_factor(weight: torch.Tensor, fold: torch.Tensor | None, gamma: torch.Tensor | None) -> torch.Tensor | None:
    """F with stored weight = W * F, broadcast against `weight` (Linear (out, in), Conv (out, in, kh, kw)):
    fold_view(s) over the input channels times gamma over the output channels; None when neither folds.
    A row with gamma = 0 is stored as zeros, as an NPU compiler folds it."""
    factor = None if fold is None else fold_view(fold.to(weight), weight)
    if gamma is not None:
        rows = gamma.detach().to(weight).reshape(-1, *([1] * (weight.ndim - 1)))
        factor = rows if factor is None else factor * rows
    return factor


def divide_by_storage_factor(values: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """values / F back in W's space (weights, or per-element quantization steps); 0 where F is 0 (a zero
    LayerScale row: whatever that row holds is multiplied by 0)."""
    if factor is None:
        return values
    return torch.where(factor == 0, torch.zeros((), dtype=values.dtype, device=values.device), values / factor)


def fold_view(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-input-channel scales (C,) viewed against a weight's input-channel dim: (1, C) or (1, C, 1, 1).

    A producer's per-channel scale s folds into its consumer as W·diag(s): every column of a Linear,
    every input-channel slice of a Conv2d.
    """
    return scale.reshape(1, -1, *([1] * (weight.ndim - 2)))


def _fold_pairs(qmodel: nn.Module, sites: dict[str, Site]) -> dict[str, str]:
    """Producer activation site -> consumer Linear (or the patch-embedding Conv) whose weight columns absorb per-channel scales."""
    folds: dict[str, str] = {"patch_embed.proj.in": "patch_embed.proj"}  # image channels -> the conv's input channels
    for i, blk in enumerate(qmodel.blocks):
        p = f"blocks.{i}"
        folds[f"{p}.norm1"] = f"{p}.attn.qkv"
        folds[f"{p}.norm2"] = f"{p}.mlp.fc1"
        if isinstance(blk.attn.norm, nn.Identity) and blk.attn.gate is None:
            folds[f"{p}.attn.sv"] = f"{p}.attn.proj"
        elif isinstance(blk.attn.norm, nn.LayerNorm) and blk.attn.gate is None:  # scale_attn_norm: sv -> LayerNorm -> proj
            folds[f"{p}.attn.norm"] = f"{p}.attn.proj"
        mlp_norm = getattr(blk.mlp, "norm", nn.Identity())
        if isinstance(mlp_norm, nn.Identity) and f"{p}.mlp.act" in sites:
            folds[f"{p}.mlp.act"] = f"{p}.mlp.fc2"
        elif isinstance(mlp_norm, nn.LayerNorm):  # scale_mlp_norm: GELU -> LayerNorm -> fc2
            folds[f"{p}.mlp.norm"] = f"{p}.mlp.fc2"
    head = getattr(qmodel, "head", None)
    if isinstance(head, QuantLinear) and head.in_site is None:
        folds["fc_norm"] = "head"  # attach_sites gave the head no input site: fc_norm (a site then) emits its input
    return {k: v for k, v in folds.items() if k in sites}
