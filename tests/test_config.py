"""Structured configs: typos and wrong types fail at composition, before any work."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError, ConfigKeyError

from tests.conftest import compose


def test_default_config_composes_with_reference_and_cifar():
    cfg = compose([])
    assert cfg.model.card.endswith("reference/vit_tiny_cifar10.json")
    assert cfg.data.root.endswith("data/cifar10") and cfg.data.eval_split == "test" and cfg.data.calib_split == "train"
    assert [s.value for s in cfg.stages] == ["evaluate"]


@pytest.mark.parametrize(
    "override",
    ["data.eval_sise=10", "data.eval_size=many", "stages=[evaluate,evalute]", "quant.candidate_bits=[eight]"],
)
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose([override])


def test_every_shipped_option_has_only_schema_keys_and_schemas_are_not_options():
    import os

    from hydra.errors import MissingConfigException

    from pipeline.config import unknown_keys

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    for group in ("model", "data", "quant", "tracking", "profile", "sensitivity", "search"):
        for option in sorted(f[:-5] for f in os.listdir(os.path.join(conf, group)) if f.endswith(".yaml")):
            assert unknown_keys(compose([f"{group}={option}"])) == [], f"{group}={option}"
    extra = compose(["+quant.weigth.bits=4", "+model.kwargs.depth=3", "+quant.sites={blocks.0.attn.sv:{bits:16}}", "+foo=1"])
    assert unknown_keys(extra) == ["quant.weigth", "foo"]  # model.kwargs and the glob keys of quant.sites are free-form
    with pytest.raises(MissingConfigException):
        compose(["quant=quant_schema"])  # the schema types conf/ but is no recipe


def test_assets_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_ASSETS", str(tmp_path))
    cfg = compose([])
    assert cfg.model.card == f"{tmp_path}/reference/vit_tiny_cifar10.json"


def test_flattened_params_are_valid_mlflow_names_and_skip_unset_values():
    from pipeline.tracking import flatten, param_key

    params = flatten({"quant": {"sites": {"blocks.1[01].*": {"bits": 16, "observer": None}}, "roles": {"qkv": {"bits": None}}}})
    assert params == {"quant.sites.blocks.1[01].*.bits": 16}  # unset values stay out
    key = param_key("quant.sites.blocks.1[01].*.bits")
    assert key.startswith("quant.sites.blocks.1_01_._.bits-") and len(key) == len("quant.sites.blocks.1_01_._.bits-") + 6
    assert param_key("model.name:x/y-z w") == "model.name:x/y-z w"  # everything MLflow allows is kept
    # two legal globs that sanitise alike stay two params (MLflow rejects a batch with a duplicate key)
    assert param_key("quant.sites.blocks.*.mlp.act.bits") != param_key("quant.sites.blocks.?.mlp.act.bits")


def test_a_sqlite_store_keeps_artifacts_beside_its_database(tmp_path):
    from pipeline.tracking import artifact_root

    assert artifact_root(f"sqlite:///{tmp_path}/db/m.db") == (tmp_path / "db" / "artifacts").as_uri()
    assert artifact_root("http://127.0.0.1:5000") is None  # a server decides
