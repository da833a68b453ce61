"""The stage chain end to end: artifacts, summary.json, MLflow runs, from_run."""

from __future__ import annotations

import json
import os
import shutil
import re
import stat

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.artifacts import read_tensors
from pipeline.runner import run_pipeline
from tests.conftest import compose, needs_assets


def runs_of(uri: str, experiment: str = "vit-ptq"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def test_chain_writes_artifacts_summary_and_nested_runs(tmp_path, tiny_overrides, mlflow_uri):
    cfg = compose([*tiny_overrides, "quant=recommended", "stages=[calibrate,quantize,evaluate]", "tracking.run_name=chain"])
    summary = run_pipeline(cfg, tmp_path / "run")
    for key in ("top1", "top1_fp32", "top1_drop", "agreement", "logit_kl", "calib_images", "quant_sites"):
        assert key in summary, key
    assert 0.0 <= summary["agreement"] <= 1.0 and summary["logit_kl"] >= 0.0
    sites = json.loads((tmp_path / "run/quantize/sites.json").read_text())
    channelwise = {n for n, s in sites.items() if s["role"] != "weight" and s["spec"]["granularity"] in ("per_channel", "ptf")}
    assert {f"blocks.{b}.{n}" for b in (0, 1) for n in ("attn.sv", "attn.v", "mlp.act")} <= channelwise  # v: per channel, not folded
    assert summary["quant_act_sites_channelwise"] == len(channelwise) > summary["quant_sites_folded"] >= 4
    assert (tmp_path / "run/calibrate/state.safetensors").is_file()
    assert (tmp_path / "run/quantize/sites.json").is_file()
    assert json.loads((tmp_path / "run/summary.json").read_text())["top1"] == summary["top1"]
    assert not list((tmp_path / "run").glob(".*.tmp"))
    sqnr = json.loads((tmp_path / "run/evaluate/site_sqnr.json").read_text())
    assert sqnr["blocks.1.attn.sv"]["role"] == "sv_attn"

    client, runs = runs_of(mlflow_uri)
    parent = next(r for r in runs if r.info.run_name == "chain")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["calibrate", "evaluate", "quantize"]
    evaluate = next(r for r in children if r.info.run_name == "evaluate")
    assert evaluate.data.metrics["top1"] == pytest.approx(summary["top1"])
    assert parent.data.params["quant.name"] == "recommended" and parent.data.tags["git_commit"]
    history = client.get_metric_history(evaluate.info.run_id, "sqnr/sv_attn")
    assert sorted(m.step for m in history) == [0, 1]  # step = block index
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts


def test_later_stage_runs_alone_from_run_dir_and_run_id(tmp_path, tiny_overrides, mlflow_uri):
    first = compose([*tiny_overrides, "quant=naive", "stages=[calibrate,quantize]", "tracking.run_name=first"])
    run_pipeline(first, tmp_path / "first")
    by_dir = run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[evaluate]", f"from_run={tmp_path / 'first'}"]), tmp_path / "second")
    _, runs = runs_of(mlflow_uri)
    run_id = next(r for r in runs if r.info.run_name == "first").info.run_id
    (tmp_path / "first").rename(tmp_path / "moved")  # force the artifact download path
    stale = tmp_path / "third/.from_run/quantize"  # an earlier download into a reused folder: never read again
    stale.mkdir(parents=True)
    (stale / "sites.json").write_text("{}")
    by_id = run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[evaluate]", f"from_run={run_id}"]), tmp_path / "third")
    assert by_id["agreement"] == by_dir["agreement"] and by_id["logit_kl"] == by_dir["logit_kl"]
    assert not (tmp_path / "third/.from_run").exists()  # the download served this run only


def test_corrupt_artifacts_are_one_line_errors_and_a_corrupt_cache_entry_is_recomputed(tmp_path, tiny_overrides):
    from pipeline.errors import PipelineError

    run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate,quantize]"]), tmp_path / "first")
    cases = (
        ("calibrate/index.json", b'{"meta": ', "quantize", "index.json: not valid JSON"),
        ("calibrate/state.safetensors", bytes(range(256)) * 2, "quantize", "calibrate/state.safetensors: not a valid safetensors file"),
        ("quantize/state.safetensors", b"\x08" + bytes(199), "evaluate", "quantize/state.safetensors: not a valid safetensors file"),
    )
    for i, (artifact, content, stage, message) in enumerate(cases):
        broken = tmp_path / f"broken{i}"
        shutil.copytree(tmp_path / "first", broken)
        (broken / artifact).write_bytes(content)
        with pytest.raises(PipelineError, match=re.escape(message)):
            run_pipeline(compose([*tiny_overrides, "quant=naive", f"stages=[{stage}]", "profile.enabled=false", f"from_run={broken}"]), tmp_path / f"run{i}")

    fp32 = compose([*tiny_overrides, "quant=none", "stages=[evaluate]"])
    first = run_pipeline(fp32, tmp_path / "fp32")
    (entry,) = (tmp_path / "cache" / "fp32_logits").glob("*.safetensors")
    entry.write_bytes(b"\x00" * 100)  # e.g. a disk that filled up under an older writer
    again = run_pipeline(fp32, tmp_path / "fp32-again")
    assert again["top1"] == first["top1"]
    assert read_tensors(entry)["logits"].shape[0] == again["images"]  # rewritten whole


def test_quantize_stores_weight_codes_that_later_stages_bind_as_they_are(tmp_path, tiny_overrides):
    """The quantized state holds every weight's integer codes (GPTQ's choice included); binding it gives the
    in-memory model bit for bit, and the codes, not a new range search or GPTQ pass, decide the weights."""

    from pipeline.models import load_model
    from pipeline.quant.calibration import CalibState, bind
    from pipeline.quant.recipe import resolve_recipe
    from pipeline.quant.sites import attach_sites, position_codes

    cfg = compose([*tiny_overrides, "quant=recommended", "quant.weight.bits=4", "stages=[calibrate,quantize]"])
    run_pipeline(cfg, tmp_path / "run")
    saved = CalibState.load(tmp_path / "run/quantize")
    sites = json.loads((tmp_path / "run/quantize/sites.json").read_text())
    weights = [n for n, s in sites.items() if s["role"] == "weight" and s["mode"] == "quant"]
    assert weights and all(saved.weight_codes(n, 4).dtype == torch.int8 for n in weights)
    assert not any(key.endswith("/hessian") for key in saved.tensors)  # GPTQ does not run again

    images = torch.randn(2, 3, 32, 32)

    def logits(state, bits=None):
        graph = attach_sites(load_model(cfg.model).model)
        specs = resolve_recipe(cfg.quant, graph)
        bind(graph, specs, state, bits)
        with torch.inference_mode():
            return graph, graph.model(images)

    bits = {n: s["bits"] for n, s in sites.items() if s["bits"]}
    _, in_memory = logits(CalibState.load(tmp_path / "run/calibrate"))
    graph, loaded = logits(saved, bits)
    assert torch.equal(loaded, in_memory)
    # Each layer's integer bias is stored too (int32 codes, the accumulator's step); a later stage's is the same.
    for name in weights:
        codes, step = graph.module(name.rsplit(".", 1)[0]).bias_codes()
        assert saved.tensors[f"{name}/4/bias_codes"].dtype == torch.int32
        assert torch.equal(saved.tensors[f"{name}/4/bias_codes"].long(), codes)
        assert torch.equal(saved.tensors[f"{name}/4/bias_step"], step.float())
    pos_codes, pos_step = position_codes(graph.model)  # the patch conv's second integer bias
    assert saved.tensors["patch_embed.proj.weight/4/pos_codes"].dtype == torch.int32
    assert torch.equal(saved.tensors["patch_embed.proj.weight/4/pos_codes"].long(), pos_codes[0])
    assert torch.equal(saved.tensors["patch_embed.proj.weight/4/pos_step"], pos_step.float())
    fc1 = "blocks.0.mlp.fc1.weight"
    saved.tensors[f"{fc1}/4/codes"] = torch.zeros_like(saved.weight_codes(fc1, 4))  # symmetric: code 0 is 0.0
    graph, _ = logits(saved, bits)
    assert not graph.module("blocks.0.mlp.fc1").qweight.any()


def test_quantized_evaluate_without_quantize_stage_is_an_error(tmp_path, tiny_overrides):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="no quantize/sites.json .* run stage 'quantize' first"):
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[evaluate]"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # found before any run opened


@needs_assets
def test_reference_fp32_top1_on_fixed_500_image_subset(tmp_path, mlflow_uri):
    """Pinned once: the reference ViT gets 430/500 = 0.86 on the seed-0 subset of CIFAR-10 test."""
    cfg = compose(["data.eval_size=500", f"cache_dir={tmp_path}", f"tracking.uri={mlflow_uri}", "device=cpu", "tracking.run_name=ref500"])
    summary = run_pipeline(cfg, tmp_path / "run")
    assert summary["images"] == 500
    assert summary["top1"] == 0.86
    _, runs = runs_of(mlflow_uri)
    child = next(r for r in runs if r.info.run_name == "evaluate" and r.data.tags.get("mlflow.parentRunId") == next(p for p in runs if p.info.run_name == "ref500").info.run_id)
    assert child.data.metrics["top1"] == 0.86


@needs_assets
def test_reference_quantized_on_small_subset(tmp_path, mlflow_uri):
    """Reference ViT, W8A16 on 200 test images after 64 calibration images: nearly lossless."""
    cfg = compose(["quant=w8a16", "stages=[calibrate,quantize,evaluate]", "data.eval_size=200", "data.calib_size=64", "data.batch_size=64", f"cache_dir={tmp_path}", f"tracking.uri={mlflow_uri}", "device=cpu", "evaluate.sqnr_images=16"])
    summary = run_pipeline(cfg, tmp_path / "run")
    assert summary["agreement"] >= 0.99
    assert abs(summary["top1_drop"]) <= 0.01
    assert summary["sqnr_min/sv_attn"] > 30


def test_a_weight_only_recipe_evaluates_without_the_profile(tmp_path, tiny_overrides):
    # no activation is quantized, so the per-site SQNR table is empty and has no minimum
    summary = run_pipeline(compose([*tiny_overrides, "quant=naive", "quant.act.enabled=false", "profile.enabled=false", "stages=[calibrate,quantize,evaluate]"]), tmp_path / "run")
    assert summary["quant_sites"] > 0 and "sqnr_min" not in summary and 0 <= summary["agreement"] <= 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
        (["profile.images=0"], "profile.images must be >= 1, got 0"),  # checked before calibrate runs, not at evaluate
        (["quant.rounding=half_down"], "quant.rounding: unknown rounding 'half_down'"),
        (["quant.candidate_bits=[8,1]"], "quant.candidate_bits=[8, 1] is outside 2..16"),
        (["stages=[calibrate,sensitivity]", "sensitivity.widths=[1]"], "sensitivity.widths=1 is outside 2..16"),
        (["stages=[calibrate,search]", "search.weight_bits=[]"], "search.weight_bits is empty"),
        (["tracking=server"], "tracking=server needs tracking.uri="),
        (["data.eval_size=-1"], "data.eval_size must be >= 0 (0 = all), got -1"),
        (["data.synthetic_size=0"], "data.synthetic_size must be >= 1, got 0"),
        (["data.calib_split=val", "data.eval_split=val"], "data.calib_split='val' and data.eval_split='val' share images"),
        (["threads=-1"], "threads must be >= 0"),
        (["device=mps"], "device=mps: choose auto, cpu, cuda or cuda:N"),
        (["device=cuda:1"] if not torch.cuda.is_available() else ["device=cuda:99"], "but no CUDA device is available" if not torch.cuda.is_available() else "CUDA device(s) are visible"),
        (["evaluate.sqnr_images=-2"], "evaluate.sqnr_images must be >= 0"),
        (["+quant.weigth.bits=4"], "unknown config key quant.weigth: not in the schema"),  # + adds any key; nothing reads this one
        (["+data.eval_sise=4", "+sensitivity.widht=[8]"], "unknown config keys data.eval_sise, sensitivity.widht:"),
    ],
)
def test_bad_setting_is_one_error_before_any_run_opens(tmp_path, tiny_overrides, overrides, message):
    from pipeline.errors import PipelineError

    base = [o for o in tiny_overrides if not (o.startswith("tracking.uri") and "tracking=server" in overrides)]
    with pytest.raises(PipelineError, match=re.escape(message)):
        run_pipeline(compose([*base, "quant=naive", "stages=[calibrate,quantize,evaluate]", *overrides]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_later_run_does_not_evaluate_on_its_calibration_images(tmp_path, tiny_overrides, mlflow_uri):
    """A run may calibrate on data.calib_split=test when it evaluates train; a later run that evaluates test
    from it would evaluate (or search) on its own calibration images."""
    from pipeline.errors import PipelineError

    first = tmp_path / "first"
    run_pipeline(compose([*tiny_overrides, "quant=naive", "data.calib_split=test", "data.eval_split=train", "stages=[calibrate,quantize]"]), first)
    runs_before = len(runs_of(mlflow_uri)[1])
    for i, stages in enumerate(("[evaluate]", "[quantize]", "[sensitivity]")):
        with pytest.raises(PipelineError, match=r"calibrated on the images of split 'test', which this run evaluates on \(data.eval_split='test'\)"):
            run_pipeline(compose([*tiny_overrides, "quant=naive", f"stages={stages}", "data.eval_split=test", f"from_run={first}"]), tmp_path / f"run{i}")
        assert not (tmp_path / f"run{i}").exists()
    assert len(runs_of(mlflow_uri)[1]) == runs_before


def test_from_run_with_another_recipe_is_an_error_before_any_run_opens(tmp_path, tiny_overrides, mlflow_uri):
    """A run labelled quant=recommended must not evaluate (or quantize) what an earlier run made with quant=naive."""
    from pipeline.errors import PipelineError

    first = tmp_path / "first"
    run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate,quantize]"]), first)
    runs_before = len(runs_of(mlflow_uri)[1])
    cases = [
        (["quant=recommended", "stages=[evaluate]"], r"quant=naive\) was quantized with another recipe than quant=recommended asks for"),
        (["quant=naive", "quant.act.bits=6", "stages=[evaluate]"], r"'bits': \(8, 6\)"),  # same recipe name, another width
        (["quant=recommended", "stages=[quantize,evaluate]"], r"recipe differs from the calibrated one"),
        (["quant=recommended", "stages=[sensitivity]"], r"recipe differs from the calibrated one"),
        (["model.kwargs.depth=3", "quant=naive", "stages=[evaluate]"], r"quantized state in .* belongs to another model"),
        (["quant=naive", "quant.act.bits=6", "stages=[quantize]"], r"was calibrated for bits \[8, 16\], not 6: add 6 to quant.candidate_bits"),
    ]
    # a calibration folder with its index but no tensors, and one whose index has lost its sites table
    no_tensors, no_sites = tmp_path / "no_tensors", tmp_path / "no_sites"
    for folder in (no_tensors, no_sites):
        shutil.copytree(first, folder)
    (no_tensors / "calibrate" / "state.safetensors").unlink()
    index = json.loads((no_sites / "calibrate" / "index.json").read_text())
    (no_sites / "calibrate" / "index.json").write_text(json.dumps({"meta": index["meta"]}))
    cases += [(["quant=naive", "stages=[quantize]"], r"has its index but no state.safetensors: rerun calibrate", no_tensors)]
    cases += [(["quant=naive", "stages=[quantize]"], r"calibration index has no 'sites' table", no_sites)]
    for i, (overrides, message, *source) in enumerate(cases):
        with pytest.raises(PipelineError, match=message):
            run_pipeline(compose([*tiny_overrides, *overrides, f"from_run={(source or [first])[0]}"]), tmp_path / f"run{i}")
        assert not (tmp_path / f"run{i}").exists()
    assert len(runs_of(mlflow_uri)[1]) == runs_before
    # the same recipe still evaluates from that run, and quantize then evaluate in one chain reads this run's artifacts
    summary = run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[quantize,evaluate]", f"from_run={first}"]), tmp_path / "again")
    assert (tmp_path / "again" / "quantize" / "sites.json").exists() and 0 <= summary["agreement"] <= 1


def test_a_failed_run_fails_what_an_interrupt_left_running_below_its_stages(tmp_path):
    """A search trial's run (below the stage run) left RUNNING by an interrupt ends FAILED with its parent;
    another pipeline's RUNNING runs are left alone."""
    from pipeline.config import TrackingConfig
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = Tracker(TrackingConfig(uri=uri))
    other.connect()
    other.start("other", {}, {})
    tracker = Tracker(TrackingConfig(uri=uri))
    tracker.connect()
    tracker.start("run", {}, {})
    with pytest.raises(KeyboardInterrupt):
        with tracker.stage("search"):
            trial = tracker.client.create_run(tracker.experiment_id, run_name="trial 3", tags={"mlflow.parentRunId": tracker.active_id})
            raise KeyboardInterrupt
    tracker.end(failed=True)
    client = MlflowClient(uri)
    assert client.get_run(trial.info.run_id).info.status == "FAILED"
    assert client.get_run(tracker.parent_id).info.status == "FAILED"
    assert client.get_run(other.parent_id).info.status == "RUNNING"


def test_a_run_that_fails_in_a_stage_puts_back_the_config_it_overwrote(tmp_path, tiny_overrides, monkeypatch):
    from pipeline import runner
    from pipeline.errors import PipelineError

    folder = tmp_path / "reused"
    folder.mkdir()
    (folder / "config.yaml").write_text("keep\n")  # a folder an earlier run (or the user) filled

    def broken(ctx):
        raise PipelineError("calibration data produce NaN or Inf at site blocks.0.norm1")

    monkeypatch.setattr(runner, "stage_function", lambda stage: broken)
    with pytest.raises(PipelineError, match="NaN or Inf"):
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate]"]), folder)
    assert (folder / "config.yaml").read_text() == "keep\n"


def test_summary_is_strict_json_when_a_figure_is_infinite(tmp_path):
    from pipeline.runner import StageContext

    ctx = StageContext(None, tmp_path, None, None, None, None, summary={"profile/logit_sqnr": float("inf"), "top1": 0.5})
    text = ctx.write_summary().read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {"profile/logit_sqnr": "inf", "top1": 0.5}


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    from pipeline.artifacts import atomic_path, write_text

    target = write_text(tmp_path / "a.json", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # as a plain write, not mkstemp's 0600


def test_evaluate_summary_drop_agreement_and_kl(tmp_path, monkeypatch, tiny_overrides):
    """top1_drop = FP32 top-1 - quantized top-1 (points: x100), agreement = argmax vs FP32's argmax (not labels),
    logit_kl = KL(softmax(FP32) || softmax(quantized))."""
    from types import SimpleNamespace

    from pipeline.stages import evaluate, quantize

    labels = torch.tensor([0, 1, 2, 3])
    ref = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [3.0, 0, 0, 1.0]])  # FP32 right 3/4
    quant = torch.tensor([[2.0, 1, 0, 0], [0, 3.0, 0, 0], [0, 2.0, 1.0, 0], [3.0, 0, 0, 2.0]])  # 2/4 right, 3/4 agree
    cfg = compose([*tiny_overrides, "quant=naive", "profile.enabled=false", "evaluate.sqnr_images=0"])
    monkeypatch.setattr(evaluate, "make_subset", lambda *a, **k: SimpleNamespace(key="k"))
    monkeypatch.setattr(evaluate, "fp32_logits", lambda *a, **k: (ref, labels, True))
    monkeypatch.setattr(quantize, "load_quantized", lambda ctx: (SimpleNamespace(model=None), {}))
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: (quant, labels))
    ctx = SimpleNamespace(cfg=cfg, fp32=SimpleNamespace(model=None, fingerprint="f"), device=torch.device("cpu"), tracker=SimpleNamespace(set_tags=lambda *a, **k: None))
    m = evaluate.run(ctx)
    assert (m["top1"], m["top1_fp32"]) == (0.5, 0.75)
    assert m["top1_drop"] == pytest.approx(0.25) and m["top1_drop_pt"] == pytest.approx(25.0)
    assert m["agreement"] == 0.75
    p, q = torch.log_softmax(ref.double(), 1), torch.log_softmax(quant.double(), 1)
    assert m["logit_kl"] == pytest.approx((p.exp() * (p - q)).sum(1).mean().item(), rel=1e-9)


def test_threads_setting_is_applied():
    from pipeline.runner import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_auto_picks_the_gpu_and_switches_tf32_off(monkeypatch):
    from pipeline.runner import select_device

    saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert select_device("auto").type == "cuda"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_chain_reads_its_own_calibration_reruns_into_a_folder_and_logs_on_the_parent(tmp_path, tiny_overrides, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.runner import run_pipeline

    base = [*tiny_overrides, "quant=naive", "profile.enabled=false", "evaluate.sqnr_images=0"]
    run_pipeline(compose([*base, "data.calib_size=8", "stages=[calibrate]"]), tmp_path / "first")
    second = [*base, "data.calib_size=16", "stages=[calibrate,quantize,evaluate]", f"from_run={tmp_path / 'first'}", "tracking.run_name=own-calib"]
    run_pipeline(compose(second), tmp_path / "second")
    meta = json.loads((tmp_path / "second/quantize/index.json").read_text())["meta"]
    assert meta["images"] == 16  # quantize bound this run's calibration, not from_run's
    summary = run_pipeline(compose(second), tmp_path / "second")  # hydra.run.dir reused: finished stages are replaced
    assert summary["calib_images"] == 16
    client = MlflowClient(mlflow_uri)
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("vit-ptq").experiment_id]) if r.info.run_name == "own-calib")
    assert parent.data.metrics["top1"] == pytest.approx(summary["top1"]) and parent.data.metrics["agreement"] == pytest.approx(summary["agreement"])


def test_a_stage_failing_after_a_finished_one_leaves_no_temp_and_ends_its_runs_failed(tmp_path, tiny_overrides, mlflow_uri, monkeypatch):
    """README: a failed stage leaves nothing half-written, its MLflow run (and the parent) end FAILED, finished
    stages stay, and a reused folder's config.yaml is put back only when no stage finished. The parent is
    tagged with the model, data and recipe, and every flattened config key is a param."""
    import yaml

    from pipeline import runner
    from pipeline.errors import PipelineError
    from pipeline.tracking import flatten, param_key

    folder = tmp_path / "reused"
    folder.mkdir()
    (folder / "config.yaml").write_text("keep\n")

    def calibrate(ctx):
        (ctx.out_dir / "state.txt").write_text("done\n")
        return {"calib_images": 1}

    def quantize(ctx):
        (ctx.out_dir / "half.txt").write_text("half\n")
        raise PipelineError("site blocks.0.attn.sv: the state's 8-bit scale is not finite")

    monkeypatch.setattr(runner, "stage_function", lambda stage: {"calibrate": calibrate, "quantize": quantize}[stage.value])
    with pytest.raises(PipelineError, match="not finite") as failure:
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate,quantize]", "tracking.run_name=half-failed"]), folder)
    assert runner.finished_stages(failure.value) == ("calibrate",)  # what the CLI's cleanup is told
    assert (folder / "calibrate" / "state.txt").is_file()  # the finished stage stays
    assert not (folder / "quantize").exists() and not list(folder.glob(".*.tmp"))  # nothing half-written
    config = yaml.safe_load((folder / "config.yaml").read_text())  # a stage finished: this run's config stays
    assert isinstance(config, dict) and config["quant"]["name"] == "naive"

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vit-ptq")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "half-failed")
    stages = {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert parent.info.status == "FAILED" and stages == {"calibrate": "FINISHED", "quantize": "FAILED"}
    tags = parent.data.tags
    assert tags["quant"] == "naive" and tags["data"] == "synthetic" and tags["model"] and tags["git_commit"] and tags["stages"] == "calibrate,quantize"
    assert set(parent.data.params) == {param_key(k) for k in flatten(config)}  # no key lost (more than one batch of 100)


def test_a_chain_that_calibrates_does_not_need_a_calibration_in_from_run(tmp_path, tiny_overrides):
    """quantize reads this run's calibration when calibrate runs before it: from_run (here a run of
    evaluate only) need not hold one."""
    fp32_run = tmp_path / "fp32"
    fp32_run.mkdir()  # e.g. an FP32 evaluation's folder, with no calibrate/
    summary = run_pipeline(compose([*tiny_overrides, "quant=naive", "profile.enabled=false", "evaluate.sqnr_images=0", "stages=[calibrate,quantize]", f"from_run={fp32_run}"]), tmp_path / "run")
    assert summary["quant_sites"] > 0 and (tmp_path / "run" / "quantize" / "sites.json").is_file()


def test_a_stale_from_run_download_is_never_read(tmp_path, tiny_overrides, mlflow_uri):
    """A download left by a killed run (`.from_run/`) is removed before a run id is downloaded again:
    here it holds a quantize folder that the run id's run (calibrate only) does not have."""
    from pipeline.errors import PipelineError

    run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate]", "tracking.run_name=calib-only"]), tmp_path / "first")
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vit-ptq")
    run_id = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "calib-only").info.run_id
    (tmp_path / "first").rename(tmp_path / "moved")  # force the download
    stale = tmp_path / "second/.from_run/quantize"
    stale.mkdir(parents=True)
    (stale / "sites.json").write_text("{}")
    with pytest.raises(PipelineError, match=r"no quantize/sites.json in .*run stage 'quantize' first"):
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[evaluate]", f"from_run={run_id}"]), tmp_path / "second")


def test_an_unreadable_index_and_a_state_without_weight_codes_are_one_line_errors(tmp_path, tiny_overrides):
    """read_json turns an OS error (here: index.json is a folder) into one line naming the file; a quantized
    state that lost a weight's codes is refused (evaluate must run the stored codes, not a new rounding)."""
    from safetensors.torch import load_file, save_file

    from pipeline.errors import PipelineError

    first = tmp_path / "first"
    run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate,quantize]", "tracking.enabled=false"]), first)
    folder = tmp_path / "dir_index"
    shutil.copytree(first, folder)
    (folder / "calibrate" / "index.json").unlink()
    (folder / "calibrate" / "index.json").mkdir()
    with pytest.raises(PipelineError, match=r"cannot read .*calibrate/index.json"):
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[quantize]", "tracking.enabled=false", f"from_run={folder}"]), tmp_path / "run1")
    no_codes = tmp_path / "no_codes"
    shutil.copytree(first, no_codes)
    path = no_codes / "quantize" / "state.safetensors"
    tensors = load_file(str(path))
    del tensors["blocks.0.mlp.fc1.weight/8/codes"]
    save_file(tensors, str(path))
    with pytest.raises(PipelineError, match="stores no codes for weight site blocks.0.mlp.fc1.weight"):
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[evaluate]", "profile.enabled=false", "tracking.enabled=false", f"from_run={no_codes}"]), tmp_path / "run2")
    path.unlink()  # the quantized index without its tensors: read when evaluate loads the state
    with pytest.raises(PipelineError, match=r"cannot read .*quantize/state.safetensors"):
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[evaluate]", "profile.enabled=false", "tracking.enabled=false", f"from_run={no_codes}"]), tmp_path / "run3")


def test_top1_reads_the_first_maximal_class_on_a_tie_like_agreement_and_the_search():
    from pipeline.inference import classification_metrics
    from pipeline.search.objective import metrics_of

    logits = torch.zeros(1, 10)
    logits[0, 3] = logits[0, 7] = 1.0  # tied: the deployed argmax reads class 3
    for label, expected in ((3, 1.0), (7, 0.0)):
        labels = torch.tensor([label])
        assert classification_metrics(logits, labels)["top1"] == expected
        assert metrics_of(logits, logits, labels)["top1"] == expected


def test_finished_stages_survive_an_error_raised_while_the_runs_end(tmp_path, tiny_overrides, monkeypatch):
    """A second Ctrl-C (or an unreachable server) while tracker.end marks the runs FAILED replaces the
    stage's error: the new one must still tell the CLI's cleanup which stages finished."""
    from pipeline import runner
    from pipeline.errors import PipelineError
    from pipeline.tracking import Tracker

    def calibrate(ctx):
        (ctx.out_dir / "state.txt").write_text("done\n")
        return {}

    def quantize(ctx):
        raise PipelineError("quantize failed")

    real_end = Tracker.end

    def end(self, failed=False):
        real_end(self, failed)
        if failed:
            raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(runner, "stage_function", lambda stage: {"calibrate": calibrate, "quantize": quantize}[stage.value])
    monkeypatch.setattr(Tracker, "end", end)
    with pytest.raises(KeyboardInterrupt) as failure:
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate,quantize]"]), tmp_path / "run")
    assert runner.finished_stages(failure.value) == ("calibrate",)
