"""Recipes: resolve `quant.*` config into one `SiteSpec` per site.

Resolution order, most specific last: built-in defaults per kind (weight or
activation) -> `quant.weight` / `quant.act` -> `quant.roles[<role>]` ->
`quant.sites[<glob>]` for each glob that matches, in file order. A role key
that is not a role, or a glob that matches no site, is an error.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable, Mapping

from pipeline.errors import PipelineError
from pipeline.quant.observers import OMSE_LOSSES
from pipeline.quant.quantizers import MAX_BITS, MIN_BITS, ROUNDING_MODES
from pipeline.quant.sites import ROLES, SiteGraph

QUANTIZERS = ("uniform", "log2", "int_softmax")
GRANULARITIES = ("per_tensor", "per_channel", "ptf")
MAX_FRAC_BITS = 4
MAX_PTF_SHIFT = 8
MIN_BIAS_BITS, MAX_BIAS_BITS = 8, 32
PTF_ROLES = ("residual", "norm_in")
"""Roles whose tensors only feed LayerNorms and residual adds: where power-of-two factors (granularity ptf) run as shifts."""


@dataclass(frozen=True)
class SiteSpec:
    """Everything that decides how one site is quantized."""

    enabled: bool = True
    quantizer: str = "uniform"  # uniform | log2 | int_softmax
    bits: int = 8
    observer: str = "minmax"
    granularity: str = "per_tensor"
    symmetric: bool = False
    signed: bool = False
    rounding: str = "half_up"
    loss: str = "l1"  # omse
    huber_delta: float = 1.0  # omse huber, in quantization steps
    sigma: float = 0.01  # ema / percentile
    warmup: int = 5  # ema / percentile min/max warm-up batches
    alpha: float = 0.9999  # percentile
    frac_bits: int = 0  # log2: fractional bits of the exponent (0: levels 2^-k; 1: 2^(-k/2), log-sqrt2)
    ptf_shift: int = 3  # granularity ptf: channel scales s_base * 2^k, k in 0..ptf_shift
    ptf_frac_bits: int = 0  # granularity ptf: mantissa bits f of the channel factors 2^k * m / 2^f, m in 2^f..2^(f+1)-1
    gptq: bool = False  # weights: choose codes by GPTQ from the layer's input Hessian (pipeline.quant.gptq)
    samples: int | None = None  # omse: values kept per channel (per tensor) for the range search; None: the observer's default
    bias_bits: int = 32  # weights: the layer's bias as an integer of this width on the accumulator's step; 0: float bias

    @property
    def per_channel(self) -> bool:
        """granularity per_channel: folded into a consuming weight, or a matmul's output channels (v)."""
        return self.granularity == "per_channel"

    @property
    def channelwise(self) -> bool:
        """One scale per channel, folded (per_channel) or as power-of-two factors (ptf)."""
        return self.granularity in ("per_channel", "ptf")

    @property
    def observer_granularity(self) -> str:
        """What the observer records: per-channel statistics for both channelwise granularities."""
        return "per_channel" if self.channelwise else "per_tensor"

    @property
    def needs_observer(self) -> bool:
        return self.enabled and self.quantizer == "uniform"

    def observer_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs of this spec's observer (beyond granularity and axis)."""
        return {
            "minmax": {},
            "ema": {"sigma": self.sigma, "warmup": self.warmup},
            "percentile": {"alpha": self.alpha, "sigma": self.sigma, "warmup": self.warmup},
            "omse": {"loss": self.loss, "huber_delta": self.huber_delta, **({"max_samples": self.samples} if self.samples is not None else {})},
        }.get(self.observer, {})

    def calibration_key(self) -> dict[str, Any]:
        """The fields calibration depends on (bits, enabled and bias_bits are chosen when binding; frac_bits is log2-only, never observed)."""
        skip = {"bits", "enabled", "frac_bits", "bias_bits"} | (set() if self.granularity == "ptf" else {"ptf_shift"})
        # keys at their "unset" value are left out, so calibration states made before the key existed still match
        skip |= (set() if self.ptf_frac_bits and self.granularity == "ptf" else {"ptf_frac_bits"}) | (set() if self.samples is not None else {"samples"})
        return {k: v for k, v in asdict(self).items() if k not in skip}


WEIGHT_DEFAULT = SiteSpec(observer="minmax", granularity="per_channel", symmetric=True, signed=True)
ACT_DEFAULT = SiteSpec(observer="minmax", granularity="per_tensor", symmetric=False, signed=False)
_SPEC_FIELDS = {f.name for f in fields(SiteSpec)}
log = logging.getLogger(__name__)


def check_disabled_recipe(quant: Mapping[str, Any]) -> None:
    """A disabled recipe (`quant=none`): its settings are checked as `resolve_recipe` checks them, and a
    warning names those it ignores. Needs no site graph (the runner's up-front check, before any run)."""
    quant = _plain(quant)
    _warn_ignored_settings(quant, _kind_and_role_specs(quant)[2])


def _kind_and_role_specs(quant: dict[str, Any]) -> tuple[SiteSpec, SiteSpec, dict[str, Any]]:
    """(weight spec, activation spec, role overrides) of a plain recipe dict, every setting checked
    (roles even where the model has no site of theirs)."""
    rounding = quant.get("rounding", "half_up")
    _check_choice("quant.rounding", rounding, ROUNDING_MODES)
    check_widths("quant.candidate_bits", quant.get("candidate_bits") or [])
    weight = _overlay(replace(WEIGHT_DEFAULT, rounding=rounding), quant.get("weight"), "quant.weight")
    act = _overlay(replace(ACT_DEFAULT, rounding=rounding), quant.get("act"), "quant.act")
    roles = quant.get("roles") or {}
    for role in roles:
        if role not in ROLES:
            raise PipelineError(f"quant.roles: unknown role '{role}' (roles: {', '.join(ROLES)})")
        _overlay(weight if role == "weight" else act, roles[role], f"quant.roles.{role}")
    return weight, act, roles


def _warn_ignored_settings(quant: dict[str, Any], roles: Mapping[str, Any]) -> None:
    """A disabled recipe quantizes nothing: say which quant.* settings given with it are ignored."""
    set_keys = [k for k in ("weight", "act") if any(v is not None for v in (quant.get(k) or {}).values())]
    set_keys += [f"roles.{r}" for r, p in roles.items() if any(v is not None for v in (p or {}).values())]
    if set_keys or quant.get("sites"):
        log.warning("quant=%s quantizes nothing: quant.%s ignored (choose a recipe, e.g. quant=recommended)", quant.get("name"), ", quant.".join(set_keys or ["sites"]))


def resolve_recipe(quant: Mapping[str, Any], graph: SiteGraph, verbose: bool = False) -> dict[str, SiteSpec]:
    """One validated SiteSpec per site of `graph` for the `quant` config node.

    `verbose` logs which per_channel / ptf requests stayed per_tensor (the runner's up-front check
    does, so the line appears once per run rather than once per stage).
    """
    quant = _plain(quant)
    weight, act, roles = _kind_and_role_specs(quant)
    if not quant.get("enabled", False):  # checked above; the runner says what it ignores (check_disabled_recipe)
        return {name: replace(ACT_DEFAULT, enabled=False) for name in graph.names()}
    globs = quant.get("sites") or {}
    names = graph.names()
    for pattern in globs:
        if not fnmatch.filter(names, pattern):
            raise PipelineError(f"quant.sites: glob '{pattern}' matches no site (e.g. {names[5]}, {names[10]})")
    specs: dict[str, SiteSpec] = {}
    kept_per_tensor: list[str] = []
    for name in names:
        site = graph[name]
        spec = weight if site.role == "weight" else act
        spec = _overlay(spec, roles.get(site.role), f"quant.roles.{site.role}")
        if _granularity_problem(spec, name, site.role, graph):
            kept_per_tensor.append(name)  # a kind- or role-wide request applies where the hardware can run it
            spec = replace(spec, granularity="per_tensor", ptf_frac_bits=0)
        for pattern, partial in globs.items():
            if fnmatch.fnmatchcase(name, pattern):
                spec = _overlay(spec, partial, f"quant.sites['{pattern}']")
        specs[name] = _check_site(spec, name, site.role, graph)
    if kept_per_tensor and verbose:
        log.info("per_channel / ptf kept per_tensor where integer hardware cannot run them: %s", ", ".join(kept_per_tensor))
    for name, spec in specs.items():
        scores = specs.get(name.rsplit(".", 1)[0] + ".scores")
        if spec.enabled and spec.quantizer == "int_softmax" and not (scores and scores.enabled and scores.symmetric and not scores.per_channel):
            raise PipelineError(f"site {name}: int_softmax needs its scores site quantized per tensor and symmetric")
    return specs


def _overlay(base: SiteSpec, partial: Mapping[str, Any] | None, where: str) -> SiteSpec:
    """Replace base's fields with partial's non-None values, validating each one."""
    if not partial:
        return base
    changes = {k: v for k, v in partial.items() if v is not None}
    unknown = set(changes) - _SPEC_FIELDS
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {sorted(unknown)}")
    if "symmetric" in changes and "signed" not in changes:
        changes["signed"] = bool(changes["symmetric"])  # symmetric data is signed unless said otherwise
    spec = replace(base, **changes)
    _check_values(spec, where)
    return spec


def check_widths(key: str, widths: Iterable[Any], required: bool = False) -> list[int]:
    """The distinct widths, sorted; one PipelineError naming `key` unless each is an integer in 2..16 (bits).

    `required`: an empty list is an error too.
    """
    widths = list(widths)
    if required and not widths:
        raise PipelineError(f"{key} is empty: need at least one width in {MIN_BITS}..{MAX_BITS}")
    for bits in widths:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            shown = widths[0] if len(widths) == 1 else widths
            raise PipelineError(f"{key}={shown} is outside {MIN_BITS}..{MAX_BITS}")
    return sorted(set(widths))


def _check_choice(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise PipelineError(f"{key}: unknown {key.rsplit('.', 1)[-1]} '{value}' (choose one of {', '.join(allowed)})")


def _check_values(spec: SiteSpec, where: str) -> None:
    from pipeline.quant.observers import OBSERVERS

    check_widths(f"{where}.bits", [spec.bits])
    if not isinstance(spec.frac_bits, int) or not 0 <= spec.frac_bits <= MAX_FRAC_BITS:
        raise PipelineError(f"{where}.frac_bits={spec.frac_bits} is outside 0..{MAX_FRAC_BITS}")
    if not isinstance(spec.ptf_shift, int) or not 1 <= spec.ptf_shift <= MAX_PTF_SHIFT:
        raise PipelineError(f"{where}.ptf_shift={spec.ptf_shift} is outside 1..{MAX_PTF_SHIFT}")
    if not isinstance(spec.ptf_frac_bits, int) or not 0 <= spec.ptf_frac_bits <= MAX_FRAC_BITS:
        raise PipelineError(f"{where}.ptf_frac_bits={spec.ptf_frac_bits} is outside 0..{MAX_FRAC_BITS}")
    if isinstance(spec.bias_bits, bool) or not isinstance(spec.bias_bits, int) or not (spec.bias_bits == 0 or MIN_BIAS_BITS <= spec.bias_bits <= MAX_BIAS_BITS):
        raise PipelineError(f"{where}.bias_bits={spec.bias_bits} must be 0 (float bias) or in {MIN_BIAS_BITS}..{MAX_BIAS_BITS}")
    if spec.samples is not None and (isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or spec.samples < 1):
        raise PipelineError(f"{where}.samples={spec.samples} must be an integer >= 1 (values kept for the omse range search)")
    checks = (
        ("quantizer", spec.quantizer, QUANTIZERS),
        ("observer", spec.observer, tuple(OBSERVERS)),
        ("granularity", spec.granularity, GRANULARITIES),
        ("rounding", spec.rounding, ROUNDING_MODES),
        ("loss", spec.loss, OMSE_LOSSES),
    )
    for key, value, allowed in checks:
        _check_choice(f"{where}.{key}", value, allowed)
    _check_observer_arguments(spec, where)


def _check_observer_arguments(spec: SiteSpec, where: str) -> None:
    """The observer's own arguments (alpha, sigma, warmup, huber_delta, ...) as its constructor checks them."""
    from pipeline.quant.observers import build_observer

    try:
        build_observer(spec.observer, granularity=spec.observer_granularity, **spec.observer_kwargs())
    except ValueError as err:
        raise PipelineError(f"{where} (observer {spec.observer}): {err}") from None


def _check_site(spec: SiteSpec, name: str, role: str, graph: SiteGraph) -> SiteSpec:
    if spec.quantizer != "uniform" and role != "intSoft":
        raise PipelineError(f"site {name}: quantizer '{spec.quantizer}' is only for the softmax output (role intSoft)")
    if spec.gptq and role != "weight":
        raise PipelineError(f"site {name}: gptq is a weight rounding (set it under quant.weight or on weight sites), not for role {role}")
    if spec.bias_bits != SiteSpec.bias_bits and role != "weight":
        raise PipelineError(f"site {name}: bias_bits sets a layer's bias with its weight (set it under quant.weight or on weight sites), not for role {role}")
    if spec.enabled and spec.samples is not None and spec.observer != "omse":
        raise PipelineError(f"site {name}: samples={spec.samples} sets the omse range search's sample; observer '{spec.observer}' keeps none (use observer omse or drop samples)")
    if spec.enabled and spec.frac_bits and spec.quantizer != "log2":
        raise PipelineError(f"site {name}: frac_bits={spec.frac_bits} needs quantizer log2 (got '{spec.quantizer}', whose levels are 2^-k: set frac_bits=0)")
    if spec.enabled and spec.quantizer == "log2":
        check_log2_reach(spec, name, graph)
    problem = _granularity_problem(spec, name, role, graph) if spec.enabled else None
    if problem:
        raise PipelineError(f"site {name} ({role}): {problem}")
    if spec.enabled and spec.ptf_frac_bits and spec.granularity != "ptf":
        raise PipelineError(f"site {name}: ptf_frac_bits={spec.ptf_frac_bits} shapes power-of-two channel factors and needs granularity ptf (got '{spec.granularity}': set ptf_frac_bits=0)")
    return spec


def check_log2_reach(spec: SiteSpec, name: str, graph: SiteGraph, where: str = "") -> None:
    """A log2 softmax grid must reach 1/N, even attention over the model's N tokens.

    Its smallest level is 2^-((2^b - 1) / 2^f) and every probability below it becomes 0: with fewer
    octaves than log2 N, a row that spreads its attention evenly would be all zeros (4 bits with
    frac_bits 3 keep only p >= 0.27). The error names the largest frac_bits that reaches 1/N; `where`
    prefixes it with the setting that asked for the width (e.g. search.act_bits).
    """
    tokens = getattr(getattr(graph.model, "patch_embed", None), "num_patches", 0) + getattr(graph.model, "num_prefix_tokens", 0)
    octaves = (2**spec.bits - 1) / 2**spec.frac_bits
    if tokens < 2 or octaves >= math.log2(tokens):
        return
    reach = (2**spec.bits - 1) / math.log2(tokens)
    fix = f"set frac_bits={math.floor(math.log2(reach))} or raise bits" if reach >= 1 else "raise bits"
    raise PipelineError(
        f"{where}site {name}: log2 at {spec.bits} bits with frac_bits={spec.frac_bits} flushes every probability below "
        f"2^-{octaves:g} = {2.0**-octaves:.3g} to 0, above 1/{tokens} (even attention over this model's {tokens} tokens): {fix}"
    )


def _granularity_problem(spec: SiteSpec, name: str, role: str, graph: SiteGraph) -> str | None:
    """Why integer hardware cannot run spec's granularity at this site, or None when it can."""
    if spec.per_channel and not graph.per_channel_ok(name):
        foldable = ", ".join(sorted({graph[n].role for n in graph.folds}))
        return (
            "per-channel activation scales must fold into a consuming weight on integer hardware "
            f"(foldable roles: {foldable}) or be a matmul's output channels (v, sites *.attn.v)"
        )
    if spec.granularity == "ptf" and role not in PTF_ROLES:
        return f"granularity ptf (power-of-two channel factors) is for tensors that feed LayerNorms and residual adds: roles {', '.join(PTF_ROLES)}"
    return None


def _plain(node: Any) -> Any:
    """OmegaConf node -> plain dict (leaves plain dicts alone)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(node)
