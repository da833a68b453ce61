"""Accuracy table of the quantization core on the full CIFAR-10 test set.

For each (model, recipe): calibrate once on `--calib` train images with every width
the table needs as a candidate, then bind each width setting (exactly what the
quantize stage does) and evaluate on all test images against the cached FP32
logits. Reports top-1, drop from FP32 (points), argmax agreement, logit KL and the
per-block `sv_attn` SQNR (dB, cumulative, over the first 64 test images).
Writes bench/results/acceptance_quant.json. Usage:
    .venv/bin/python bench/acceptance_quant.py [--models vit_tiny_cifar10,vit_tiny_cifar10_outliers]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_quant import compose  # noqa: E402
from pipeline.config import register_configs, register_resolvers  # noqa: E402
from pipeline.data import make_subset  # noqa: E402
from pipeline.inference import classification_metrics, fp32_logits, predict  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.profile.collect import first_images, site_sqnr  # noqa: E402
from pipeline.profile.metrics import argmax_agreement, logit_kl  # noqa: E402
from pipeline.quant.calibration import bind, calibrate  # noqa: E402
from pipeline.quant.recipe import resolve_recipe  # noqa: E402
from pipeline.quant.sites import attach_sites  # noqa: E402
from pipeline.runner import set_threads  # noqa: E402

# (label, weight bits, activation bits) per model kind and recipe.
WIDTHS = {
    ("reference", "w8a16"): [("W8A16", 8, 16)],
    ("reference", None): [("W8A8", 8, 8), ("W8A16", 8, 16), ("W4A8", 4, 8), ("W6A6", 6, 6)],
    ("outliers", None): [("W8A8", 8, 8)],
}


def evaluate_widths(model_name: str, recipe: str, widths, calib_images: int, device: torch.device) -> list[dict]:
    cfg = compose([f"model={model_name}", f"quant={recipe}", f"data.calib_size={calib_images}", "data.eval_size=0", "data.batch_size=100", "data.num_workers=1"])
    fp32 = load_model(cfg.model)
    eval_set = make_subset(cfg.data, fp32, "eval")
    calib_set = make_subset(cfg.data, fp32, "calib")
    ref, labels, _ = fp32_logits(fp32.model, fp32.fingerprint, eval_set, device, cfg.cache_dir)
    graph = attach_sites(fp32.model)
    specs = resolve_recipe(cfg.quant, graph)
    acts = sorted({a for _, _, a in widths} | set(cfg.quant.candidate_bits))
    t0 = time.time()
    state = calibrate(graph, specs, calib_set.loader, device, acts)
    calib_s = time.time() - t0
    fp_graph = attach_sites(fp32.model)
    rows = []
    for label, wbits, abits in widths:
        bits = {n: (wbits if graph[n].role == "weight" else abits) for n, s in specs.items() if s.enabled}
        bind(graph, specs, state, bits)
        logits, _ = predict(graph.model, eval_set, device, f"{recipe} {label}")
        q = classification_metrics(logits, labels)
        fp = classification_metrics(ref, labels)
        sqnr = site_sqnr(fp_graph, graph, first_images(eval_set.loader, 64), device)
        row = {
            "model": model_name,
            "recipe": recipe,
            "widths": label,
            "top1": q["top1"],
            "top1_fp32": fp["top1"],
            "drop_pt": round(100 * (fp["top1"] - q["top1"]), 2),
            "agreement": argmax_agreement(ref, logits),
            "logit_kl": logit_kl(ref, logits),
            "sv_attn_sqnr_db": [round(sqnr[f"blocks.{i}.attn.sv"], 2) for i in range(len(fp32.model.blocks))],
            "calibrate_s": round(calib_s, 1),
            "images": q["images"],
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sv_attn_sqnr_db"}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_cifar10,vit_tiny_cifar10_outliers")
    parser.add_argument("--recipes", default="recommended,naive")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "bench/results/acceptance_quant.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    parser.add_argument("--append", action="store_true", help="add rows to an existing results file")
    args = parser.parse_args()
    register_resolvers()
    register_configs()
    set_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.append and out.is_file() else []
    for model_name in args.models.split(","):
        kind = "outliers" if "outliers" in model_name else "reference"
        for recipe in args.recipes.split(","):
            widths = WIDTHS.get((kind, recipe), WIDTHS[(kind, None)])
            rows += evaluate_widths(model_name, recipe, widths, args.calib, device)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"calib_images": args.calib, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
