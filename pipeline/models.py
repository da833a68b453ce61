"""timm models from a hub name, a checkpoint file or a model card."""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


@dataclass
class LoadedModel:
    """An FP32 model in eval mode plus what the data pipeline needs to feed it.

    `data_config` is timm's data config (input_size, mean, std, interpolation, crop_pct);
    `plain_transform` is True for model cards, whose images are fed as ToTensor + Normalize
    with no resize or crop.
    """

    model: nn.Module
    name: str
    timm_name: str
    data_config: dict[str, Any]
    plain_transform: bool
    fingerprint: str
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes"))


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Build the FP32 model the config names (card, checkpoint or hub weights)."""
    if cfg.card:
        if cfg.checkpoint or cfg.pretrained:
            raise PipelineError(f"model.card ({cfg.card}) brings its own weights: drop model.checkpoint / model.pretrained, or use model=timm")
        loaded = _load_card(Path(cfg.card), dict(cfg.kwargs))
        if cfg.name != loaded.timm_name:
            raise PipelineError(f"model.name={cfg.name} differs from the card's timm model '{loaded.timm_name}': use model=timm for another architecture")
        return loaded
    model = _create(cfg.name, cfg.pretrained, dict(cfg.kwargs))
    source: dict[str, Any] = {"timm_name": cfg.name, "pretrained": cfg.pretrained}
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        load_checkpoint(model, path)
        source["checkpoint"] = str(path)
    data_config = timm.data.resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size:  # kwargs such as img_size=32 change the input, not the pretrained cfg
        data_config["input_size"] = (data_config["input_size"][0], *img_size)
    name = Path(cfg.checkpoint).stem if cfg.checkpoint else cfg.name
    return _finish(model, name, cfg.name, dict(cfg.kwargs), data_config, plain_transform=False, source=source)


def _load_card(card_path: Path, extra_kwargs: dict[str, Any]) -> LoadedModel:
    if not card_path.is_file():
        raise PipelineError(f"model card not found: {card_path}")
    try:
        card = json.loads(card_path.read_text())
        timm_name, kwargs = card["timm_name"], {**card.get("timm_kwargs", {}), **extra_kwargs}
        mean, std = tuple(card["mean"]), tuple(card["std"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PipelineError(f"model card {card_path} is not a valid card (needs timm_name, timm_kwargs, mean, std): {e}") from None
    weights = next((card_path.with_suffix(s) for s in WEIGHT_SUFFIXES if card_path.with_suffix(s).is_file()), None)
    if weights is None:
        raise PipelineError(f"no weights beside model card {card_path} (looked for {card_path.stem}{{{','.join(WEIGHT_SUFFIXES)}}})")
    model = _create(timm_name, False, kwargs)
    load_checkpoint(model, weights)
    img_size = kwargs.get("img_size", model.default_cfg.get("input_size", (3, 224, 224))[-1])
    img_size = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    data_config = {"input_size": (3, *img_size), "mean": mean, "std": std, "interpolation": "bilinear", "crop_pct": 1.0}
    source = {"card": str(card_path), "weights": str(weights), "timm_name": timm_name}
    return _finish(model, card_path.stem, timm_name, kwargs, data_config, plain_transform=True, source=source)


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if not timm.is_model(name):
        raise PipelineError(f"unknown timm model name '{name}' (timm.list_models('*vit*') lists the ViTs)")
    try:
        with torch.random.fork_rng(devices=[]):  # random init (no weights given) is the same in every run; it draws on the CPU only
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError, KeyError) as e:  # timm asserts on many bad arguments (num_heads, global_pool, ...)
        why = " ".join(str(e).split())[:300] or f"{type(e).__name__} in timm.create_model, no message"
        raise PipelineError(f"bad kwargs for timm model '{name}': {why}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise PipelineError(f"could not fetch pretrained weights for '{name}' (no network? use model.checkpoint=..., or HF_HUB_OFFLINE=1 to read only the local Hugging Face cache and skip the hub's retries): {e}".splitlines()[0]) from None
        raise PipelineError(f"could not build timm model '{name}': {e}".splitlines()[0]) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors/.pth/.pt state dict; floating tensors are upcast to float32."""
    if not path.is_file():
        raise PipelineError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt"):
            with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py saves its args beside the weights
                state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "model_ema"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
                    break
        else:
            raise PipelineError(f"unsupported checkpoint format '{path.suffix}' for {path} (use {', '.join(WEIGHT_SUFFIXES)})")
    except PipelineError:
        raise
    except pickle.UnpicklingError as e:  # torch's own text starts with advice on weights_only=False, which we never take
        reason = str(e).partition("WeightsUnpickler error:")[2].strip().split(". ")[0] or "unpickling failed"
        raise PipelineError(f"cannot read checkpoint {path} as a plain state dict ({reason.splitlines()[0]}): a corrupt file, or one holding more than tensors; save model.state_dict() with torch.save or as .safetensors") from None
    except Exception as e:  # corrupt file: any reader error becomes one line
        raise PipelineError(f"cannot read checkpoint {path}: not a valid {path.suffix} file, corrupt or truncated ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state dict strictly; a mismatch names the first offending keys and shapes."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:3]))
    if missing:
        problems.append(f"missing keys {missing[:3]}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}" + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
    if problems:
        raise PipelineError(f"checkpoint {path} does not fit the model: " + ", ".join(problems))
    model.load_state_dict(state, strict=True)


def model_fingerprint(model: nn.Module, timm_name: str, kwargs: dict[str, Any]) -> str:
    """SHA-1 (16 hex digits) of what fixes the model's function: the timm architecture and its kwargs
    (some, such as num_heads or act_layer, change the outputs but no weight shape), the timm version,
    and the state dict (names, dtypes and bytes). Keys the FP32 logits cache and the stage states."""
    h = hashlib.sha1()
    h.update(json.dumps({"timm_name": timm_name, "kwargs": kwargs, "timm": timm.__version__}, sort_keys=True, default=str).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _finish(model: nn.Module, name: str, timm_name: str, kwargs: dict[str, Any], data_config: dict[str, Any], plain_transform: bool, source: dict[str, Any]) -> LoadedModel:
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, name, timm_name, data_config, plain_transform, model_fingerprint(model, timm_name, kwargs), source)
