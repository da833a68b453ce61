"""Cost of the per-site profiler, measured in one run on the same images.

On the reference model (calibrated with `quant=recommended` on N train images), over
the first N test images in the profiler's batches (`profile.batch_size`):

- one quantized forward pass over the N images,
- the cumulative profile over the same N images (FP32 site graph + quantized graph
  with every site's statistics, plus the data-free weight rows); the FP32 site
  graph's own forward is reported too (the reference the profile needs),
- what the profile adds to `evaluate`: the cumulative profile less one quantized forward,
  because evaluate takes the profiled images' logits from the profile's quantized forward
  (pipeline/stages/evaluate.py) and runs only the other images through `predict`,
- the isolated mode (one pass per site), reported separately; `--isolated-sites K`
  times an evenly spaced sample of K sites and extrapolates to all of them (the pass's
  setup, one FP32 forward that caches every block's input, is timed apart and counted once).

Target: profiling <= 3x the quantized forward, checked both ways: what it adds to evaluate, and
standalone (the profile's own quantized forward included). Writes bench/results/profile.json.
Usage:
    .venv/bin/python bench/bench_profile.py [--images 64] [--recipe recommended] [--isolated-sites 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, synchronize, write_result  # noqa: E402

from pipeline.config import register_configs, register_resolvers  # noqa: E402
from pipeline.data import make_subset  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.profile.flags import Thresholds, flag_rows  # noqa: E402
from pipeline.profile.profiler import cumulative_pass, isolated_candidates, isolated_pass, profile_batches, weight_pass  # noqa: E402
from pipeline.profile.report import write_report  # noqa: E402
from pipeline.quant.calibration import bind, calibrate  # noqa: E402
from pipeline.quant.recipe import resolve_recipe  # noqa: E402
from pipeline.quant.sites import attach_sites  # noqa: E402
from pipeline.runner import select_device, set_threads  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@torch.inference_mode()
def quantized_forward(graph, batches: list[torch.Tensor], device: torch.device) -> None:
    for images in batches:
        graph.model(images.to(device))
    synchronize(device)  # a GPU's queued kernels count in the time read after this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--recipe", default="recommended")
    parser.add_argument("--model", default="vit_tiny_cifar10")
    parser.add_argument("--repeats", type=int, default=5, help="best of N for the forward and the cumulative profile (interleaved)")
    parser.add_argument("--isolated-sites", type=int, default=0, help="time the isolated mode on K evenly spaced sites and extrapolate (0 = all sites)")
    parser.add_argument("--batch-size", type=int, default=0, help="images per profiling forward (0 = profile.batch_size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "bench/results/profile.json"))
    args = parser.parse_args()

    register_resolvers()
    register_configs()
    cfg = compose([f"model={args.model}", f"quant={args.recipe}", f"data.eval_size={args.images}", f"data.calib_size={args.images}", "data.batch_size=64", "data.num_workers=0"])
    set_threads(args.threads)
    device = select_device(args.device)
    fp32 = load_model(cfg.model)
    graph = attach_sites(fp32.model)
    specs = resolve_recipe(cfg.quant, graph)
    calib = [b for b in make_subset(cfg.data, fp32, "calib").loader]  # decoded once: time compute, not JPEG decoding
    state = calibrate(graph, specs, calib, device, list(cfg.quant.candidate_bits))
    bind(graph, specs, state)
    graph.to(device)
    fp_graph = attach_sites(fp32.model).to(device)
    batch_size = args.batch_size or int(cfg.profile.batch_size)
    batches = profile_batches(make_subset(cfg.data, fp32, "eval").loader, args.images, batch_size)

    quantized_forward(graph, batches, device)  # warm-up
    fp_graph.set_mode("fp")
    quantized_forward(fp_graph, batches, device)
    best = {"forward": float("inf"), "fp32_sites": float("inf"), "cumulative": float("inf"), "weights": float("inf")}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
        t0 = time.perf_counter()
        quantized_forward(graph, batches, device)
        best["forward"] = min(best["forward"], time.perf_counter() - t0)
        fp_graph.set_mode("fp")
        t0 = time.perf_counter()
        quantized_forward(fp_graph, batches, device)
        best["fp32_sites"] = min(best["fp32_sites"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        weights = weight_pass(graph)
        t1 = time.perf_counter()
        cumulative = cumulative_pass(fp_graph, graph, batches, device)
        best["weights"] = min(best["weights"], t1 - t0)
        best["cumulative"] = min(best["cumulative"], time.perf_counter() - t0)
    t_forward, t_cumulative = best["forward"], best["cumulative"]

    rows = flag_rows(weights.rows + cumulative.rows, Thresholds.from_config(cfg.profile))
    fp_logits = cumulative.fp_logits
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_report(Path(tmp), rows, cumulative.output, {**weights.histograms, **cumulative.histograms}, Thresholds(), images=args.images)
    t_report = time.perf_counter() - t0

    candidates = isolated_candidates(graph)
    chosen = candidates if args.isolated_sites <= 0 else candidates[:: max(1, len(candidates) // args.isolated_sites)][: args.isolated_sites]
    setup = isolated_pass(graph, batches, fp_logits, device, names=[]).seconds  # the FP32 block inputs, cached once per pass
    isolated = isolated_pass(graph, batches, fp_logits, device, {r["site"]: r for r in weights.rows}, names=chosen)
    per_site = max(0.0, isolated.seconds - setup) / max(1, len(chosen))

    result = {
        "model": args.model,
        "recipe": args.recipe,
        "images": args.images,
        "batch_size": batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "sites_profiled": len(rows),
        "seconds": {
            "quantized_forward": t_forward,
            "fp32_site_graph_forward": best["fp32_sites"],
            "cumulative_profile": t_cumulative,
            "added_to_evaluate": t_cumulative - t_forward,
            "of_which_weight_rows": best["weights"],
            "report": t_report,
            "isolated_measured": isolated.seconds,
            "isolated_setup": setup,
            "isolated_all_sites": setup + per_site * len(candidates),
        },
        "isolated": {"sites_timed": len(chosen), "sites_total": len(candidates), "per_site_s": per_site, "extrapolated": len(chosen) < len(candidates)},
        "ratios": {
            "added_to_evaluate_vs_quantized_forward": (t_cumulative - t_forward) / t_forward,
            "cumulative_vs_quantized_forward": t_cumulative / t_forward,
            "isolated_vs_quantized_forward": (setup + per_site * len(candidates)) / t_forward,
        },
        "targets": {"added_to_evaluate_vs_quantized_forward": 3.0, "cumulative_vs_quantized_forward": 3.0},
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
