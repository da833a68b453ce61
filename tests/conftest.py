"""Shared fixtures: composed configs, a temporary MLflow store, tiny timm models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import PROJECT_ROOT
from pipeline.config import register_configs, register_resolvers

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
register_resolvers()
register_configs()

ASSETS = Path(os.environ.get("PIPELINE_ASSETS", PROJECT_ROOT.parent / "shared"))
REFERENCE_CARD = ASSETS / "reference" / "vit_tiny_cifar10.json"
CIFAR = ASSETS / "data" / "cifar10"
needs_assets = pytest.mark.skipif(not REFERENCE_CARD.is_file() or not CIFAR.is_dir(), reason="shared reference model / CIFAR-10 not found")

TINY_VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2}}


def compose(overrides: list[str]):
    """The real config (conf/), composed with overrides, as the app would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


class StepTracker:
    """Stands in for pipeline.tracking's tracker: keeps the metrics of each `log_metrics` call by step."""

    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged[step] = metrics


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core machine: one intra-op thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tiny_overrides(tmp_path, mlflow_uri) -> list[str]:
    """A 2-block ViT on synthetic data with a temp cache and the test MLflow store."""
    return [
        "model=timm",
        f"model.name={TINY_VIT['name']}",
        *[f"+model.kwargs.{k}={v}" for k, v in TINY_VIT["kwargs"].items()],
        "data=synthetic",
        f"cache_dir={tmp_path / 'cache'}",
        f"tracking.uri={mlflow_uri}",
        "device=cpu",
    ]


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd or PROJECT_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
