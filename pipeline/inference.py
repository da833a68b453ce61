"""Forward passes over a data subset, and the FP32 logits cache."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.artifacts import ArtifactError, read_tensors, write_tensors
from pipeline.data import DataSubset

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict(model: nn.Module, subset: DataSubset, device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) float32 on CPU and labels (N,) int64, in the subset's order."""
    model.eval().to(device)
    logits, labels = [], []
    for images, target in tqdm(subset.loader, desc=desc, unit="batch", leave=False):
        logits.append(model(images.to(device, non_blocking=True)).float().cpu())
        labels.append(target)
    return torch.cat(logits), torch.cat(labels)


def fp32_logits(model: nn.Module, fingerprint: str, subset: DataSubset, device: torch.device, cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """FP32 logits and labels of `subset`, cached per (model fingerprint, subset, device kind).

    The device kind (`cpu`, or `cuda-<GPU name>`) is in the key because GPU kernels (fused attention,
    other summation orders) round differently from the CPU's and from another GPU's.
    Returns (logits (N, K), labels (N,), cache_hit).
    """
    path = Path(cache_dir) / "fp32_logits" / f"{fingerprint}-{subset.key}-{device_kind(device)}.safetensors"
    if path.is_file():
        try:
            cached = read_tensors(path)
            if cached["logits"].shape[0] == len(subset):
                return cached["logits"], cached["labels"], True
        except (ArtifactError, KeyError) as e:  # a cache entry is only a shortcut: recompute it
            log.warning("ignoring the unreadable FP32 logits cache %s (%s); recomputing it", path, e)
    home = next(model.parameters()).device
    logits, labels = predict(model, subset, device, desc="fp32")
    model.to(home)  # the FP32 model is shared by the stages, which copy it (attach_sites) and move the copies themselves
    write_tensors(path, {"logits": logits, "labels": labels})
    return logits, labels, False


def device_kind(device: torch.device | str) -> str:
    """`cpu`, or `cuda-<GPU name>` (file-name safe, e.g. `cuda-NVIDIA-H200`): what the FP32 cache is keyed on."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return "cuda-" + re.sub(r"[^A-Za-z0-9_.]+", "-", torch.cuda.get_device_name(device)).strip("-")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1, top5 (shares in 0..1) and mean cross-entropy loss (nats) of logits (N, K).

    top1 reads the argmax as deployed (on a tie the first maximal class, like `argmax_agreement`);
    topk's order among tied logits is unspecified, so it serves top5 only.
    """
    k = min(5, logits.shape[1])
    top5 = logits.topk(k, dim=1).indices
    return {
        "top1": (logits.argmax(dim=1) == labels).double().mean().item(),
        "top5": (top5 == labels[:, None]).any(dim=1).double().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits.double(), labels).item(),
        "images": int(labels.numel()),
    }
