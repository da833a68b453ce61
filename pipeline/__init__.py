"""Post-training quantization pipeline for timm Vision Transformers on integer NPUs."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
