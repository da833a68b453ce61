"""Model loading: cards, checkpoints (float16 -> float32), clear mismatch errors."""

from __future__ import annotations

import random

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models import load_model
from tests.conftest import REFERENCE_CARD, TINY_VIT, needs_assets


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(name=TINY_VIT["name"], kwargs=dict(TINY_VIT["kwargs"]), **kw)


def test_float16_safetensors_load_as_float32(tmp_path):
    ref = timm.create_model(TINY_VIT["name"], **TINY_VIT["kwargs"])
    half = {k: v.half() for k, v in ref.state_dict().items()}
    save_file(half, str(tmp_path / "w.safetensors"))
    loaded = load_model(tiny_cfg(checkpoint=str(tmp_path / "w.safetensors")))
    for k, v in loaded.model.state_dict().items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, half[k].float()), k


def test_pth_checkpoint_with_state_dict_key(tmp_path):
    ref = timm.create_model(TINY_VIT["name"], **TINY_VIT["kwargs"])
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    loaded = load_model(tiny_cfg(checkpoint=str(tmp_path / "w.pth")))
    assert torch.equal(loaded.model.head.weight, ref.head.weight)


def test_timm_training_checkpoint_and_unreadable_ones(tmp_path):
    import argparse

    ref = timm.create_model(TINY_VIT["name"], **TINY_VIT["kwargs"])
    torch.save({"epoch": 3, "arch": TINY_VIT["name"], "state_dict": ref.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "train.pth")
    assert torch.equal(load_model(tiny_cfg(checkpoint=str(tmp_path / "train.pth"))).model.head.weight, ref.head.weight)
    torch.save({"state_dict": ref.state_dict(), "optimizer": torch.optim.SGD(ref.parameters(), lr=0.1)}, tmp_path / "object.pth")
    with pytest.raises(PipelineError, match=r"as a plain state dict \(Unsupported global: GLOBAL torch.optim.sgd.SGD.*save model.state_dict\(\)"):
        load_model(tiny_cfg(checkpoint=str(tmp_path / "object.pth")))
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(PipelineError, match="cannot read checkpoint .*corrupt.pth"):
        load_model(tiny_cfg(checkpoint=str(tmp_path / "corrupt.pth")))
    (tmp_path / "random.pth").write_bytes(random.Random(2).randbytes(1000))  # the reader fails with an internal error ("pop from empty list")
    with pytest.raises(PipelineError, match=r"cannot read checkpoint .*random.pth: not a valid \.pth file, corrupt or truncated \("):
        load_model(tiny_cfg(checkpoint=str(tmp_path / "random.pth")))


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    other = timm.create_model(TINY_VIT["name"], **{**TINY_VIT["kwargs"], "num_classes": 7})
    save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(PipelineError, match=r"head\.weight: checkpoint \(7, 192\) vs model \(10, 192\)"):
        load_model(tiny_cfg(checkpoint=str(tmp_path / "w.safetensors")))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = timm.create_model(TINY_VIT["name"], **TINY_VIT["kwargs"]).state_dict()
    state["extra.weight"] = state.pop("cls_token")
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(PipelineError, match=r"missing keys \['cls_token'\].*unexpected keys \['extra\.weight'\]"):
        load_model(tiny_cfg(checkpoint=str(tmp_path / "w.safetensors")))


def test_missing_checkpoint_and_unknown_model():
    with pytest.raises(PipelineError, match="checkpoint file not found"):
        load_model(tiny_cfg(checkpoint="/nonexistent/w.safetensors"))
    with pytest.raises(PipelineError, match="unknown timm model name 'vit_tinyy'"):
        load_model(ModelConfig(name="vit_tinyy"))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_heads": 5}, "dim should be divisible by num_heads"),  # timm asserts
        ({"global_pool": "xx"}, "pooling"),  # asserts too
        ({"act_layer": "nosuch"}, "nosuch"),  # a KeyError from timm's layer registry
        ({"no_such_argument": 1}, "no_such_argument"),  # a TypeError
        ({"pos_embed": "bogus"}, "AssertionError in timm.create_model, no message"),  # a bare assert
    ],
)
def test_bad_timm_kwargs_are_one_line(kwargs, named):
    cfg = tiny_cfg()
    cfg.kwargs.update(kwargs)
    with pytest.raises(PipelineError, match=f"bad kwargs for timm model '{TINY_VIT['name']}': .*{named}") as err:
        load_model(cfg)
    assert "\n" not in str(err.value)


def test_fingerprint_tells_apart_architectures_that_share_the_weights(tmp_path):
    """num_heads changes the function but no weight shape: same checkpoint, other outputs, other fingerprint."""
    ref = timm.create_model(TINY_VIT["name"], **TINY_VIT["kwargs"])
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    three = load_model(tiny_cfg(checkpoint=str(tmp_path / "w.safetensors")))
    six = load_model(ModelConfig(name=TINY_VIT["name"], kwargs={**TINY_VIT["kwargs"], "num_heads": 6}, checkpoint=str(tmp_path / "w.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(three.model(x), six.model(x))
    assert three.fingerprint != six.fingerprint
    assert load_model(tiny_cfg(checkpoint=str(tmp_path / "w.safetensors"))).fingerprint == three.fingerprint


def test_pretrained_weights_offline_and_not_cached_is_one_error(tmp_path, monkeypatch):
    """model.pretrained=true with HF_HUB_OFFLINE and an empty cache: one line naming the model and the remedies."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PipelineError, match=r"could not fetch pretrained weights for 'vit_tiny_patch16_224' .*model\.checkpoint=.*HF_HUB_OFFLINE=1") as err:
        load_model(ModelConfig(name="vit_tiny_patch16_224", pretrained=True))
    assert "\n" not in str(err.value)


@needs_assets
def test_a_card_with_another_name_checkpoint_or_hub_weights_is_an_error(tmp_path):
    """A card brings its own architecture and weights: other model settings would be silently ignored."""
    with pytest.raises(PipelineError, match="differs from the card's timm model 'vit_tiny_patch16_224'"):
        load_model(ModelConfig(name="deit_small_patch16_224", card=str(REFERENCE_CARD)))
    with pytest.raises(PipelineError, match=r"brings its own weights: drop model.checkpoint / model.pretrained"):
        load_model(ModelConfig(card=str(REFERENCE_CARD), checkpoint=str(tmp_path / "w.pt")))
    with pytest.raises(PipelineError, match=r"brings its own weights"):
        load_model(ModelConfig(card=str(REFERENCE_CARD), pretrained=True))


@needs_assets
def test_reference_card_loads_float32_with_card_mean_std():
    loaded = load_model(ModelConfig(card=str(REFERENCE_CARD)))
    assert loaded.name == "vit_tiny_cifar10" and loaded.plain_transform
    assert loaded.data_config["input_size"] == (3, 32, 32)
    assert loaded.data_config["mean"] == (0.4914, 0.4822, 0.4465)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.num_classes == 10


def test_pth_checkpoints_under_model_or_model_ema_load(tmp_path):
    import timm

    from pipeline.config import ModelConfig
    from pipeline.models import load_model
    from tests.conftest import TINY_VIT

    ref = timm.create_model(TINY_VIT["name"], **TINY_VIT["kwargs"])
    for key in ("model", "model_ema"):  # DeiT's layout: the weights under "model" beside optimizer state etc.
        torch.save({key: ref.state_dict(), "epoch": 3}, tmp_path / f"{key}.pth")
        loaded = load_model(ModelConfig(name=TINY_VIT["name"], kwargs=dict(TINY_VIT["kwargs"]), checkpoint=str(tmp_path / f"{key}.pth")))
        assert torch.equal(loaded.model.head.weight, ref.head.weight)


def test_fingerprint_covers_the_timm_version(monkeypatch):
    import timm

    from pipeline.models import model_fingerprint

    model = torch.nn.Linear(2, 2)
    before = model_fingerprint(model, "x", {})
    monkeypatch.setattr(timm, "__version__", "0.0.1")
    assert model_fingerprint(model, "x", {}) != before
