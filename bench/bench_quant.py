"""Timing ratios of the quantization core, measured in one run on the same images.

- FP32 evaluation (timm's own forward) over N test images,
- calibration (observers at every site, qparams for every candidate width) over N train images,
  compared with one FP32 pass over those same calibration images,
- quantized evaluation over the same N test images.

Targets: quantized evaluation <= 2x FP32; calibration <= 3x one FP32 pass over the
calibration images. Writes bench/results/quant.json. Usage:
    .venv/bin/python bench/bench_quant.py [--images 512] [--recipe recommended] [--model vit_tiny_cifar10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_result  # noqa: E402

from pipeline.config import register_configs, register_resolvers  # noqa: E402
from pipeline.data import make_subset  # noqa: E402
from pipeline.inference import predict  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.quant.calibration import bind, calibrate  # noqa: E402
from pipeline.quant.recipe import resolve_recipe  # noqa: E402
from pipeline.quant.sites import attach_sites  # noqa: E402
from pipeline.runner import set_threads  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Best wall time (s) over `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--recipe", default="recommended")
    parser.add_argument("--model", default="vit_tiny_cifar10")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/quant.json"))
    args = parser.parse_args()

    register_resolvers()
    register_configs()
    cfg = compose([f"model={args.model}", f"quant={args.recipe}", f"data.eval_size={args.images}", f"data.calib_size={args.images}", "data.batch_size=64", "data.num_workers=0"])
    set_threads(0)
    device = torch.device("cpu")
    fp32 = load_model(cfg.model)
    eval_set = make_subset(cfg.data, fp32, "eval")
    calib_set = make_subset(cfg.data, fp32, "calib")
    # Decode the images once so that every timing below measures compute, not JPEG decoding.
    eval_set.loader = [b for b in eval_set.loader]
    calib_set.loader = [b for b in calib_set.loader]

    t_fp32_eval, _ = timed(lambda: predict(fp32.model, eval_set, device, "fp32"), args.repeats)
    t_fp32_calib, _ = timed(lambda: predict(fp32.model, calib_set, device, "fp32 calib"), args.repeats)
    graph = attach_sites(fp32.model)
    specs = resolve_recipe(cfg.quant, graph)
    t_calib, state = timed(lambda: calibrate(graph, specs, calib_set.loader, device, list(cfg.quant.candidate_bits)), 1)
    t_bind, _ = timed(lambda: bind(graph, specs, state), 1)
    t_q_eval, _ = timed(lambda: predict(graph.model, eval_set, device, "quantized"), args.repeats)

    result = {
        "model": args.model,
        "recipe": args.recipe,
        "images": args.images,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "seconds": {"fp32_eval": t_fp32_eval, "fp32_calib_pass": t_fp32_calib, "calibrate": t_calib, "quantize_bind": t_bind, "quantized_eval": t_q_eval},
        "ratios": {
            "quantized_eval_vs_fp32": t_q_eval / t_fp32_eval,
            "calibrate_vs_fp32_pass": t_calib / t_fp32_calib,
        },
        "targets": {"quantized_eval_vs_fp32": 2.0, "calibrate_vs_fp32_pass": 3.0},
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
