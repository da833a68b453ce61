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
        (["stages=[evaluate,evalute]"], ["unknown stage 'evalute'"]),
        (["quant=naive", "quant.act.bits=17", "stages=[calibrate]", "data=synthetic", "model=timm", "+model.kwargs.img_size=32", "+model.kwargs.depth=1"], ["quant.act.bits=17 is outside 2..16"]),
        (["quant=naive", "quant.act.observer=maxmin", "stages=[calibrate]", "data=synthetic", "model=timm", "+model.kwargs.img_size=32", "+model.kwargs.depth=1"], ["unknown observer 'maxmin'"]),
    ],
)
def test_bad_input_ends_with_one_clear_line(tmp_path, args, fragments):
    out = tmp_path / "run"
    proc = run_cli([*args, f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path}/x.db" if not any(a.startswith("tracking.uri") for a in args) else "device=cpu"])
    assert_one_line_error(proc, *fragments)
    assert not (out / "summary.json").exists()
    assert not out.exists() or not any(p.name in ("evaluate", "calibrate") for p in out.iterdir())


def test_checkpoint_that_does_not_fit(tmp_path):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=5).state_dict(), str(tmp_path / "w.safetensors"))
    proc = run_cli(["model=timm", "+model.kwargs.img_size=32", "+model.kwargs.patch_size=4", "+model.kwargs.num_classes=10", f"model.checkpoint={tmp_path}/w.safetensors", f"hydra.run.dir={tmp_path}/run", "tracking.enabled=false"])
    assert_one_line_error(proc, "does not fit the model", "head.weight: checkpoint (5, 192) vs model (10, 192)")
    assert not (tmp_path / "run").exists()
