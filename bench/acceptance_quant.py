"""Accuracy table of the quantization core on the full CIFAR-10 test set.

For each (model, recipe): calibrate once on `--calib` train images with every width
the table needs as a candidate, then bind each width setting (exactly what the
quantize stage does) and evaluate on all test images against the cached FP32
logits. Reports top-1, drop from FP32 (points), argmax agreement, logit KL and the
per-block `sv_attn` SQNR over the first 64 test images (dB): cumulative (vs the FP32
model's sv_attn) and the quantizer's own (the site's output vs its input in the quantized model).
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
from bench.common import machine  # noqa: E402
from pipeline.artifacts import write_text  # noqa: E402
from pipeline.config import register_configs, register_resolvers  # noqa: E402
from pipeline.data import make_subset  # noqa: E402
from pipeline.inference import classification_metrics, fp32_logits, predict  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.profile.collect import first_images, quantizer_sqnr, site_sqnr  # noqa: E402
from pipeline.profile.metrics import argmax_agreement, logit_kl  # noqa: E402
from pipeline.quant.calibration import bind, calibrate  # noqa: E402
from pipeline.quant.recipe import resolve_recipe  # noqa: E402
from pipeline.quant.sites import attach_sites  # noqa: E402
from pipeline.runner import select_device, set_threads  # noqa: E402

# (label, weight bits, activation bits) per model kind and recipe.
WIDTHS = {
    ("reference", "w8a16"): [("W8A16", 8, 16)],
    ("reference", "recommended quant.roles.intSoft.frac_bits=0"): [("W8A8", 8, 8)],
    ("reference", None): [("W8A8", 8, 8), ("W8A16", 8, 16), ("W4A8", 4, 8), ("W6A6", 6, 6)],
    ("outliers", "w8a16"): [("W8A16", 8, 16)],
    ("outliers", None): [("W8A8", 8, 8)],
}
ALL_WIDTHS = [("W8A8", 8, 8), ("W8A16", 8, 16), ("W4A8", 4, 8), ("W6A6", 6, 6), ("W16A16", 16, 16)]


def evaluate_widths(model_name: str, recipe: str, widths, calib_images: int, device: torch.device, eval_images: int = 0) -> list[dict]:
    """Rows for one model and `recipe` ("name" or "name override ...", e.g. "recommended quant.roles.intSoft.frac_bits=1")."""
    name, *overrides = recipe.split()
    cfg = compose([f"model={model_name}", f"quant={name}", f"data.calib_size={calib_images}", f"data.eval_size={eval_images}", "data.batch_size=100", "data.num_workers=1", *overrides])
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
    fp_graph = attach_sites(fp32.model).to(device)
    rows = []
    for label, wbits, abits in widths:
        bits = {n: (wbits if graph[n].role == "weight" else abits) for n, s in specs.items() if s.enabled}
        bind(graph, specs, state, bits)
        logits, _ = predict(graph.model, eval_set, device, f"{recipe} {label}")
        q = classification_metrics(logits, labels)
        fp = classification_metrics(ref, labels)
        sqnr = site_sqnr(fp_graph, graph, first_images(eval_set.loader, 64), device)
        own = quantizer_sqnr(graph, first_images(eval_set.loader, 64), device)
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
            "sv_attn_quantizer_sqnr_db": [round(own[f"blocks.{i}.attn.sv"], 2) for i in range(len(fp32.model.blocks))],
            "calibrate_s": round(calib_s, 1),
            "images": q["images"],
            "device": device.type,
            "threads": torch.get_num_threads(),
            "machine": machine(),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("sv_attn")}), flush=True)
    return rows


TARGETS = {  # (model kind, recipe, widths) -> (max drop in points, min agreement), from the issue
    ("reference", "recommended", "W8A8"): (0.2, 0.99),
    ("reference", "w8a16", "W8A16"): (0.1, 0.998),
    ("reference", "recommended", "W4A8"): (0.3, 0.97),
    ("reference", "recommended", "W6A6"): (0.5, 0.97),
    ("outliers", "recommended", "W8A8"): (0.5, 0.98),
}


def markdown(rows: list[dict]) -> str:
    """The README tables: accuracy per (model, recipe, widths) with the target, then sv_attn SQNR per block."""
    lines = ["| model | recipe | widths | top-1 | drop (pt) | agreement | logit KL | target (drop / agreement) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = "outliers" if "outliers" in r["model"] else "reference"
        target = TARGETS.get((kind, r["recipe"], r["widths"]))
        verdict = "measured"
        if target:
            met = r["drop_pt"] <= target[0] and r["agreement"] >= target[1]
            verdict = f"≤ {target[0]} / ≥ {100 * target[1]:.1f}%: " + ("met" if met else "**missed**")
        lines.append(f"| {r['model']} | `{r['recipe']}` | {r['widths']} | {r['top1']:.4f} | {r['drop_pt']:.2f} | {100 * r['agreement']:.2f}% | {r['logit_kl']:.4f} | {verdict} |")
    lines += ["", "| model | recipe | widths | sv_attn SQNR per block 0..11 (dB): quantizer's own / cumulative |", "|---|---|---|---|"]
    for r in rows:
        if r.get("sv_attn_quantizer_sqnr_db") and r["widths"] == "W8A8":
            own = " ".join(f"{v:.0f}" for v in r["sv_attn_quantizer_sqnr_db"])
            cumulative = " ".join(f"{v:.0f}" for v in r["sv_attn_sqnr_db"])
            lines.append(f"| {r['model']} | `{r['recipe']}` | {r['widths']} | own: {own}<br>cumulative: {cumulative} |")
    return "\n".join(lines)


def _merge_rows(rows: list[dict], new: list[dict]) -> list[dict]:
    """rows with each new row in place of the old row of the same (model, recipe, widths), else appended."""
    key = lambda r: (r["model"], r["recipe"], r["widths"])  # noqa: E731
    position = {key(r): i for i, r in enumerate(rows)}
    merged = list(rows)
    for r in new:
        if key(r) in position:
            merged[position[key(r)]] = r
        else:
            merged.append(r)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_cifar10,vit_tiny_cifar10_outliers")
    parser.add_argument("--recipes", default="recommended,recommended quant.roles.intSoft.frac_bits=0,naive,w8a16", help='comma-separated; a recipe may carry overrides: "recommended quant.roles.intSoft.frac_bits=1"')
    parser.add_argument("--widths", default=None, help="comma-separated labels to keep (e.g. W8A8,W4A8); default: the table's")
    parser.add_argument("--eval", type=int, default=0, help="test images (0 = all 10,000; fewer only for exploration)")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "bench/results/acceptance_quant.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    parser.add_argument("--append", action="store_true", help="add rows to an existing results file (a new row replaces the old one of the same model, recipe and widths)")
    parser.add_argument("--table", action="store_true", help="print the README tables of --out and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())["rows"]))
        return
    register_resolvers()
    register_configs()
    set_threads(args.threads)
    device = select_device("auto")
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.append and out.is_file() else []
    for model_name in args.models.split(","):
        kind = "outliers" if "outliers" in model_name else "reference"
        for recipe in args.recipes.split(","):
            widths = WIDTHS.get((kind, recipe), WIDTHS.get((kind, recipe.split()[0]), WIDTHS[(kind, None)]))
            if args.widths:
                widths = [w for w in ALL_WIDTHS if w[0] in args.widths.split(",")]
            rows = _merge_rows(rows, evaluate_widths(model_name, recipe, widths, args.calib, device, args.eval))
            write_text(out, json.dumps({"calib_images": args.calib, "rows": rows}, indent=2) + "\n")  # atomic


if __name__ == "__main__":
    main()
