"""Structured configs: the schema behind `conf/`.

Every config group is a dataclass registered in Hydra's ConfigStore, so a typo in
a key or a value of the wrong type fails with Hydra's own message before any work
starts. The YAML files under `conf/` only fill in values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Stage(str, Enum):
    """Stages of the chain, run in the order the user lists them."""

    calibrate = "calibrate"
    quantize = "quantize"
    evaluate = "evaluate"
    sensitivity = "sensitivity"
    search = "search"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
    granularity: Optional[str] = None  # per_tensor | per_channel
    symmetric: Optional[bool] = None
    signed: Optional[bool] = None
    loss: Optional[str] = None  # omse: l1 | l2 | huber
    huber_delta: Optional[float] = None  # omse huber, in quantization steps
    sigma: Optional[float] = None  # ema / percentile smoothing
    warmup: Optional[int] = None  # ema / percentile min/max warm-up batches
    alpha: Optional[float] = None  # percentile


@dataclass
class QuantConfig:
    """A quantization recipe (`conf/quant/*.yaml`)."""

    name: str = "none"
    enabled: bool = False
    rounding: str = "half_up"  # half_up = floor(x + 0.5), as hardware does; or half_even
    candidate_bits: List[int] = field(default_factory=lambda: [8, 16])  # calibrated for every site
    weight: SpecConfig = field(default_factory=SpecConfig)
    act: SpecConfig = field(default_factory=SpecConfig)
    roles: Dict[str, SpecConfig] = field(default_factory=dict)
    sites: Dict[str, SpecConfig] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    """MLflow: an embedded SQLite store under mlruns/ unless `uri` names a server."""

    uri: Optional[str] = None  # None = sqlite:///<project>/mlruns/mlflow.db
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
    wasted_levels_pct: float = 10.0  # flag: no clipping and fewer than this % of the 2^bits levels used
    sqnr_min_db: float = 10.0  # flag: SQNR below this (dB)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    stages: List[Stage] = field(default_factory=lambda: [Stage.evaluate])
    from_run: Optional[str] = None  # run dir or MLflow run id whose artifacts earlier stages read
    device: Device = Device.auto
    threads: int = 0  # torch intra-op threads; 0 = one per physical core
    assets: str = MISSING  # root of shared assets (reference models, data)
    cache_dir: str = MISSING  # FP32 logits cache


def register_configs() -> None:
    """Register the schema so `conf/` YAML files are validated against it."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="quant", name="quant_schema", node=QuantConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    cs.store(group="profile", name="profile_schema", node=ProfileConfig)


def register_resolvers() -> None:
    """`${project_root:}` resolves to the repository root, whatever the current directory."""
    from omegaconf import OmegaConf

    from pipeline import PROJECT_ROOT

    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
