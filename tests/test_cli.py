"""The command line as a user meets it: one clear error line, non-zero exit, nothing half-written."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, proc.stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["model=timm", "model.name=vit_tinyy"], ["unknown timm model name 'vit_tinyy'"]),
        (["model=timm", "model.checkpoint=/no/such/file.safetensors"], ["checkpoint file not found: /no/such/file.safetensors"]),
        (["data.root=/no/such/dir"], ["data root not found: /no/such/dir"]),
        (["tracking.uri=http://127.0.0.1:9"], ["MLflow tracking store http://127.0.0.1:9 is unreachable"]),
        (["tracking.uri=htp://127.0.0.1:9"], ["MLflow tracking store htp://127.0.0.1:9"]),  # a malformed scheme
        (["stages=[evaluate,evalute]"], ["unknown stage 'evalute'"]),
        (["quant=naive", "quant.act.bits=17", "stages=[calibrate]", "data=synthetic", "model=timm", "+model.kwargs.img_size=32", "+model.kwargs.depth=1"], ["quant.act.bits=17 is outside 2..16"]),
        (["quant=naive", "quant.act.observer=maxmin", "stages=[calibrate]", "data=synthetic", "model=timm", "+model.kwargs.img_size=32", "+model.kwargs.depth=1"], ["unknown observer 'maxmin'"]),
    ],
)
def test_bad_input_ends_with_one_clear_line(tmp_path, args, fragments):
    out = tmp_path / "2026-11-28" / "run"  # as Hydra's mlruns/outputs/<date>/<time>
    proc = run_cli([*args, f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path}/x.db" if not any(a.startswith("tracking.uri") for a in args) else "device=cpu"])
    assert_one_line_error(proc, *fragments)
    # no run folder is left; an empty day folder goes only under mlruns/outputs (elsewhere it may be the user's)
    assert not out.exists() and not any(out.parent.glob("*"))


def test_checkpoint_that_does_not_fit(tmp_path):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=5).state_dict(), str(tmp_path / "w.safetensors"))
    proc = run_cli(["model=timm", "+model.kwargs.img_size=32", "+model.kwargs.patch_size=4", "+model.kwargs.num_classes=10", f"model.checkpoint={tmp_path}/w.safetensors", f"hydra.run.dir={tmp_path}/run", "tracking.enabled=false"])
    assert_one_line_error(proc, "does not fit the model", "head.weight: checkpoint (5, 192) vs model (10, 192)")
    assert not (tmp_path / "run").exists()


def test_role_typo_on_the_command_line_is_one_line(tmp_path):
    proc = run_cli(["quant=recommended", "quant.roles.sv_atn.bits=16", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "unknown role 'sv_atn' in quant.roles.sv_atn.bits=16", "sv_attn")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()


def test_sigterm_removes_the_stage_temp_folder_and_fails_the_mlflow_runs(tmp_path):
    """A run stopped by SIGTERM (a scheduler's timeout) cleans up like Ctrl-C instead of leaving RUNNING runs."""
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from tests.conftest import PROJECT_ROOT, TINY_VIT

    run, uri = tmp_path / "run", f"sqlite:///{tmp_path}/x.db"
    args = ["model=timm", f"model.name={TINY_VIT['name']}", *[f"+model.kwargs.{k}={v}" for k, v in TINY_VIT["kwargs"].items()]]
    args += ["data=synthetic", "data.synthetic_size=16384", "data.batch_size=1", "quant=none", "stages=[evaluate]", f"cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / ".evaluate.tmp").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # into the stage: its MLflow run is open
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "error: interrupted" in stderr.strip().splitlines()[-1]
    assert not run.exists()  # no finished stage: nothing left behind
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("vit-ptq").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]  # the parent and the evaluate run


def test_a_failed_run_keeps_a_folder_it_did_not_make(tmp_path):
    """hydra.run.dir pointing at an existing folder: a failure removes only what the run made there."""
    folder = tmp_path / "results"
    (folder / ".hydra").mkdir(parents=True)  # an earlier run's files, and the user's own
    for name in ("mine.csv", "notes.log", "config.yaml", "__main__.log"):
        (folder / name).write_text("keep\n")
    proc = run_cli(["model=timm", "model.name=vit_tinyy", "hydra.run.dir=.", "tracking.enabled=false"], cwd=folder)
    assert_one_line_error(proc, "unknown timm model name 'vit_tinyy'")
    assert all((folder / name).read_text() == "keep\n" for name in ("mine.csv", "notes.log", "config.yaml"))
    assert (folder / "__main__.log").read_text().startswith("keep\n")  # the earlier run's log, appended to
    # the run's .hydra/ went; the job log stays: Hydra appended this run's lines to an earlier run's log
    assert sorted(p.name for p in folder.iterdir()) == ["__main__.log", "config.yaml", "mine.csv", "notes.log"]
    theirs = tmp_path / "theirs"  # a folder without an earlier run: this run's log goes with its .hydra/
    theirs.mkdir()
    (theirs / "mine.csv").write_text("keep\n")
    proc = run_cli(["model=timm", "model.name=vit_tinyy", "hydra.run.dir=.", "tracking.enabled=false"], cwd=theirs)
    assert_one_line_error(proc, "unknown timm model name 'vit_tinyy'")
    assert [p.name for p in theirs.iterdir()] == ["mine.csv"]
    (theirs / ".hydra").mkdir()  # the user's own, where Hydra writes no output subdir
    proc = run_cli(["model=timm", "model.name=vit_tinyy", "hydra.run.dir=.", "hydra.output_subdir=null", "tracking.enabled=false"], cwd=theirs)
    assert_one_line_error(proc, "unknown timm model name 'vit_tinyy'")
    assert sorted(p.name for p in theirs.iterdir()) == [".hydra", "mine.csv"]
    empty_parent = tmp_path / "mine"
    empty_parent.mkdir()
    proc = run_cli(["model=timm", "model.name=vit_tinyy", f"hydra.run.dir={empty_parent / 'run'}", "tracking.enabled=false"])
    assert_one_line_error(proc, "unknown timm model name 'vit_tinyy'")
    assert empty_parent.is_dir() and not (empty_parent / "run").exists()  # only the day folders of mlruns/outputs go
    dated = tmp_path / "2026-01-01"  # the user's own folder, named like a day folder of mlruns/outputs
    dated.mkdir()
    proc = run_cli(["model=timm", "model.name=vit_tinyy", f"hydra.run.dir={dated / 'run'}", "tracking.enabled=false"])
    assert_one_line_error(proc, "unknown timm model name 'vit_tinyy'")
    assert dated.is_dir()


def test_a_failing_sweep_job_does_not_stop_the_sweep(tmp_path):
    from tests.conftest import TINY_VIT

    args = ["-m", "model=timm", f"model.name={TINY_VIT['name']}", *[f"+model.kwargs.{k}={v}" for k, v in TINY_VIT["kwargs"].items()]]
    args += ["data=synthetic", "data.synthetic_size=8", "data.batch_size=0,4", "stages=[evaluate]", f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: job #0: data.batch_size must be >= 1, got 0", "error: 1 of the sweep's 2 jobs failed (see the lines above)"]
    assert not (tmp_path / "sweep" / "0").exists() and (tmp_path / "sweep" / "1" / "summary.json").exists()


def test_sweep_functions_and_interpolations_of_stages_are_left_to_hydra():
    from pipeline.__main__ import check_overrides

    assert check_overrides(["stages=choice([calibrate],[evaluate])", "stages=${oc.env:STAGES}"]) is None
    assert "unknown stage 'evalute'" in check_overrides(["stages=[evaluate,evalute]"])


def test_an_error_raised_while_handling_an_interrupt_counts_as_the_interrupt():
    """Optuna 5.0, interrupted inside its own bookkeeping, raises UnboundLocalError from its `finally`:
    the CLI must still end with its one interrupt line (exit 130), not a traceback."""
    from pipeline.__main__ import _interrupt_in_chain

    def optuna_like():
        try:
            raise KeyboardInterrupt("SIGTERM")
        finally:
            raise UnboundLocalError("cannot access local variable 'updated_state'")

    with pytest.raises(UnboundLocalError) as caught:
        optuna_like()
    assert _interrupt_in_chain(caught.value)
    assert not _interrupt_in_chain(ValueError("a bug")) and not _interrupt_in_chain(None)


def test_bad_input_exits_with_code_2(tmp_path):
    proc = run_cli(["model=timm", "model.name=vit_tinyy", f"hydra.run.dir={tmp_path / 'run'}", "tracking.enabled=false"])
    assert proc.returncode == 2, proc.stderr


def test_cleanup_after_a_finished_stage_keeps_it_and_removes_only_the_half_made(tmp_path):
    """README: a failed run removes what it left half-made (temp stage folders, the from_run download);
    finished stages stay, with config.yaml, .hydra/ and the log; a folder's earlier files are never touched."""
    from pipeline.runner import cleanup_failed_run

    run = tmp_path / "run"
    for folder in ("calibrate", ".quantize.tmp", ".from_run/quantize", ".hydra"):
        (run / folder).mkdir(parents=True)
    for name in ("calibrate/state.safetensors", ".quantize.tmp/half.json", ".from_run/quantize/sites.json", "config.yaml", "__main__.log", "mine.csv"):
        (run / name).write_text("x\n")
    cleanup_failed_run(run, frozenset({"mine.csv"}))
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "__main__.log", "calibrate", "config.yaml", "mine.csv"]
    assert (run / "calibrate" / "state.safetensors").is_file()
    # a reused folder that already held calibrate/: this run finished it again, then failed in quantize
    (run / ".quantize.tmp").mkdir()
    cleanup_failed_run(run, frozenset({"mine.csv", "calibrate", "config.yaml"}), finished_here=("calibrate",))
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "__main__.log", "calibrate", "config.yaml", "mine.csv"]


def test_a_bug_in_a_stage_cleans_up_before_the_traceback(tmp_path):
    """__main__: an exception that is not bad input (a bug) still removes what the run made, then Hydra
    prints the traceback (exit 1)."""
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT, TINY_VIT

    run = tmp_path / "run"
    args = ["model=timm", f"model.name={TINY_VIT['name']}", *[f"+model.kwargs.{k}={v}" for k, v in TINY_VIT["kwargs"].items()]]
    args += ["data=synthetic", "quant=none", "stages=[evaluate]", f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false", f"hydra.run.dir={run}"]
    code = (
        "import sys, runpy, pipeline.runner as r\n"
        "def broken(stage):\n    def fn(ctx):\n        (ctx.out_dir / 'half.json').write_text('{')\n        raise RuntimeError('a bug')\n    return fn\n"
        "r.stage_function = broken\n"
        f"sys.argv = ['pipeline', *{args!r}]\n"
        "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr, proc.stderr[-2000:]
    assert not run.exists()  # no stage finished: nothing left behind
