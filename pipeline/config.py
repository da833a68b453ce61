"""Structured configs: the schema behind `conf/`.

Every config group is a dataclass registered in Hydra's ConfigStore, so a typo in
a key or a value of the wrong type fails with Hydra's own message before any work
starts. The YAML files under `conf/` only fill in values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.quant.sites import ROLES


class Stage(str, Enum):
    """Stages of the chain, run in the order the user lists them."""

    calibrate = "calibrate"
    quantize = "quantize"
    evaluate = "evaluate"
    sensitivity = "sensitivity"
    search = "search"


@dataclass
class ModelConfig:
    """A timm model: by hub name, by checkpoint, or by a model card (.json)."""

    name: str = "vit_tiny_patch16_224"  # timm model name
    pretrained: bool = False  # hub weights (needs network access)
    checkpoint: Optional[str] = None  # .safetensors, .pth or .pt state dict
    card: Optional[str] = None  # model card .json; its weights file has the same stem
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs


@dataclass
class DataConfig:
    """Image data: an ImageFolder root with calibration and evaluation splits, or synthetic tensors."""

    kind: str = "imagefolder"  # imagefolder | synthetic
    root: Optional[str] = None  # folder holding the split folders (or the classes directly)
    calib_split: str = "train"  # feeds calibration, sensitivity and search
    eval_split: str = "test"  # feeds evaluation only
    calib_size: int = 512  # images; 0 = all
    eval_size: int = 1000  # images; 0 = all
    search_size: int = 256  # images drawn from calib_split, disjoint from the calibration subset
    seed: int = 0  # seeds every subset
    batch_size: int = 100
    num_workers: int = 2
    synthetic_size: int = 64  # images per split for kind=synthetic


@dataclass
class SpecConfig:
    """One quantizer's settings; every field None means 'inherit from the level above'.

    Levels, most specific last: `quant.weight` / `quant.act` (kind defaults) ->
    `quant.roles[<role>]` -> `quant.sites[<glob>]` (in file order).
    """

    enabled: Optional[bool] = None
    quantizer: Optional[str] = None  # uniform | log2 | int_softmax
    bits: Optional[int] = None  # 2..16
    observer: Optional[str] = None  # minmax | ema | percentile | omse | kl
    granularity: Optional[str] = None  # per_tensor | per_channel (folded into the consuming weight) | ptf (power-of-two channel factors; residual, norm_in)
    symmetric: Optional[bool] = None
    signed: Optional[bool] = None
    loss: Optional[str] = None  # omse: l1 | l2 | huber
    huber_delta: Optional[float] = None  # omse huber, in quantization steps
    sigma: Optional[float] = None  # ema / percentile smoothing
    warmup: Optional[int] = None  # ema / percentile min/max warm-up batches
    alpha: Optional[float] = None  # percentile
    frac_bits: Optional[int] = None  # log2 (intSoft): fractional exponent bits, 0 = levels 2^-k, 1 = 2^(-k/2)
    ptf_shift: Optional[int] = None  # granularity ptf: channel scales s_base * 2^k, k in 0..ptf_shift (default 3)
    ptf_frac_bits: Optional[int] = None  # granularity ptf: mantissa bits f, factors 2^k * m / 2^f, m in 2^f..2^(f+1)-1 (default 0)
    gptq: Optional[bool] = None  # weights: GPTQ rounding from the calibration inputs' Hessian (default false)
    samples: Optional[int] = None  # omse: values kept per channel (per tensor) for the range search (default 512 per channel, 8192 per tensor)
    bias_bits: Optional[int] = None  # weights: the layer's bias as an integer of this width on the accumulator's step, 8..32; 0 = float bias (default 32)


RolesConfig = make_dataclass(
    "RolesConfig",
    [(role, SpecConfig, field(default_factory=SpecConfig)) for role in ROLES],
    namespace={"__doc__": "Per-role overrides (`quant.roles.<role>`): one SpecConfig per site role, all unset by default."},
)
"""Every role is a key, so `quant.roles.qkv.bits=16` works from the command line for any recipe, and a role typo is Hydra's error."""


@dataclass
class QuantConfig:
    """A quantization recipe (`conf/quant/*.yaml`)."""

    name: str = "none"
    enabled: bool = False
    rounding: str = "half_up"  # half_up = floor(x + 0.5), as hardware does; or half_even
    candidate_bits: List[int] = field(default_factory=lambda: [8, 16])  # calibrated for every site
    weight: SpecConfig = field(default_factory=SpecConfig)
    act: SpecConfig = field(default_factory=SpecConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    sites: Dict[str, SpecConfig] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    """MLflow: an embedded SQLite store under mlruns/ unless `uri` names a server."""

    uri: Optional[str] = None  # None = sqlite:///<project>/mlruns/mlflow.db
    server: bool = False  # tracking=server: a uri is required
    experiment: str = "vit-ptq"
    run_name: Optional[str] = None
    enabled: bool = True


@dataclass
class EvaluateConfig:
    sqnr_images: int = 64  # per-site SQNR over the first N evaluated images, when profile.enabled=false


@dataclass
class ProfileConfig:
    """Per-site profiler, run inside `evaluate` on the quantized model (`profile/` in the stage folder).

    Cumulative mode (always, when enabled): the whole model quantized, every site
    compared with the FP32 model's same site. Isolated mode (opt-in, one pass per
    site): only that site quantized. Flag thresholds are in the metrics' units.
    """

    enabled: bool = True
    images: int = 64  # first N evaluation images
    batch_size: int = 32  # images per profiling forward; the FP32 site tensors of one batch stay in memory
    isolated: bool = False  # also profile each site quantized alone (one pass per site)
    dump: List[str] = field(default_factory=list)  # site globs: save FP32 / codes / dequantized tensors
    dump_samples: int = 4  # images kept per dumped or traced site
    trace: Optional[str] = None  # a site name: print x -> x/scale -> rounded -> clamped -> code -> dequantized
    trace_elements: int = 8  # elements in the trace (half of them the worst-error ones)
    worst_k: int = 6  # histogram plots for the k lowest-SQNR sites
    cos_min: float = 0.99  # flag: mean per-token cosine below this
    saturation_max_pct: float = 5.0  # flag: % of values clipped (low + high) above this
    saturation_zero_pct: float = 0.01  # 'no clipping' for the wasted-levels flag: % clipped at most this
    wasted_levels_pct: float = 10.0  # flag: no clipping and the median channel uses fewer than this % of the 2^bits levels
    sqnr_min_db: float = 10.0  # flag: SQNR below this (dB)


@dataclass
class SensitivityConfig:
    """Per-site sensitivity (`sensitivity` stage): Hutchinson Hessian traces, HAWQ-V2 scores, noise injection.

    Every score is a predicted or measured increase of the task loss / logit KL when one
    site is quantized at a given width, on fixed calibration-split batches.
    """

    batches: int = 2  # calibration batches (of batch_size images) for the Hutchinson estimator
    batch_size: int = 32  # images per sensitivity batch (double backward keeps the graph in memory)
    hutchinson_iters: int = 50  # max Rademacher samples per batch
    hutchinson_tol: float = 0.01  # stop when the running mean of the total trace moves less than this (relative)
    hutchinson_min_iters: int = 8  # never stop before this many samples
    activation_hessian: bool = True  # also the trace w.r.t. each activation site (same HVPs, no extra pass)
    noise_bits: int = 8  # width whose quantization-noise variance is injected
    noise_batches: int = 2  # batches (of batch_size images) per noise-injection / isolated pass
    noise: str = "uniform"  # uniform U(-step/2, step/2) | gaussian N(0, step^2/12)
    noise_clip: bool = False  # also clamp to the site's representable range (models saturation)
    weights: bool = True  # noise injection on weight sites too (per output channel step)
    isolated: bool = True  # measure each site quantized alone at noise_bits (the reference for Spearman)
    widths: List[int] = field(default_factory=lambda: [4, 8, 16])  # weight widths scored (plus search/candidate widths)
    seed: int = 0


@dataclass
class SearchConfig:
    """Mixed-precision search (`search` stage): per-site (or per tied group) widths under a cost budget, with Optuna."""

    method: str = "prior"  # prior | random | greedy | all (the three, one study each)
    trials: int = 30  # evaluations per method
    objective: str = "kl"  # kl (logit KL vs FP32, min) | agreement (argmax vs FP32, max) | top1 (max)
    budget: float = 1.10  # max cost, all-INT8 = 1.0
    act_bits: List[int] = field(default_factory=lambda: [8, 16])
    weight_bits: List[int] = field(default_factory=lambda: [8, 16])
    ties: List[str] = field(default_factory=lambda: ["qkv"])  # qkv | weight_with_input | block | role
    weight_cost_weight: float = 1.0  # weight bytes (bits/8 per element)
    act_cost_weight: float = 1.0  # activation bytes moved per image (bits/8 per element)
    prior: str = "noise_kl"  # sensitivity score behind seeds, bias and repair: noise_kl | noise_loss | hessian | isolated_kl
    seeds: int = 4  # greedy solutions enqueued first (method=prior)
    n_startup: int = 10  # completed trials before TPE takes over (seeds + prior-biased draws)
    prior_temperature: float = 0.5  # P(raise group) proportional to (gain/cost)^temperature
    greedy_width: int = 4  # method=greedy: candidate raises measured per step
    storage: Optional[str] = None  # Optuna RDB URL; None = sqlite:///<project>/mlruns/optuna.db
    study_name: Optional[str] = None  # None = derived from model, recipe, budget, method and a hash of the space
    seed: int = 0
    workers: int = 1  # processes sharing the study (one in this process, the rest spawned)
    heartbeat_s: int = 5  # trial heartbeat; a trial silent for 4x this is failed and retried
    test: bool = True  # re-evaluate the best assignment on the evaluation split
    sensitivity: Optional[str] = None  # a sensitivity.json; None = this run's / from_run's (computed first if absent)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    stages: List[Stage] = field(default_factory=lambda: [Stage.evaluate])
    from_run: Optional[str] = None  # run dir or MLflow run id whose artifacts earlier stages read
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = one per CPU this process may use
    assets: str = MISSING  # root of shared assets (reference models, data)
    cache_dir: str = MISSING  # FP32 logits cache


def register_configs() -> None:
    """Register the schema so `conf/` YAML files are validated against it.

    Only the root is stored: its typed fields validate every group's YAML (`quant: QuantConfig`, ...).
    A schema stored in a group would also be an option of that group (`quant=quant_schema`).
    """
    ConfigStore.instance().store(name="config_schema", node=Config)


def unknown_keys(node: DictConfig, path: str = "") -> list[str]:
    """Dotted paths of keys that no schema field declares: a `+key=value` override adds them to typed nodes.

    Free-form nodes (`model.kwargs`, the glob keys of `quant.sites`) are not dataclasses and take any key;
    their values are checked where they are typed (each `quant.sites` entry is a SpecConfig).
    """
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    found: list[str] = []
    for key in node.keys():
        where = f"{path}{key}"
        if fields is not None and key not in fields:
            found.append(where)
            continue
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        child = node[key]
        if isinstance(child, DictConfig):
            found += unknown_keys(child, where + ".")
    return found


def register_resolvers() -> None:
    """`${project_root:}` resolves to the repository root, whatever the current directory."""
    from omegaconf import OmegaConf

    from pipeline import PROJECT_ROOT

    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
