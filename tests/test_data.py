"""Data subsets: deterministic per seed, disjoint calibration/search, clamped sizes, clear errors."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import build_dataset, check_splits, make_subset, seeded_order, split_size
from pipeline.errors import PipelineError
from pipeline.models import LoadedModel
from tests.conftest import CIFAR, needs_assets


def fake_model(mean: tuple[float, ...] = (0.5,) * 3) -> LoadedModel:
    model = torch.nn.Linear(1, 1)
    model.num_classes = 10
    cfg = {"input_size": (3, 32, 32), "mean": mean, "std": (0.25,) * 3}
    return LoadedModel(model, "fake", "fake", cfg, True, "0" * 16)


def test_seeded_order_is_deterministic_and_seed_dependent():
    assert torch.equal(seeded_order(100, 0, "train"), seeded_order(100, 0, "train"))
    assert not torch.equal(seeded_order(100, 0, "train"), seeded_order(100, 1, "train"))
    assert sorted(seeded_order(100, 3, "test").tolist()) == list(range(100))


def test_synthetic_subsets_are_fixed_and_nested():
    cfg = DataConfig(kind="synthetic", synthetic_size=40, eval_size=10, calib_size=8, search_size=8, num_workers=0)
    a, b = make_subset(cfg, fake_model(), "eval"), make_subset(cfg, fake_model(), "eval")
    assert torch.equal(a.indices, b.indices) and a.key == b.key
    bigger = make_subset(DataConfig(**{**cfg.__dict__, "eval_size": 20}), fake_model(), "eval")
    assert torch.equal(bigger.indices[:10], a.indices)  # subsets are prefixes of one order
    assert bigger.key != a.key
    calib, search = make_subset(cfg, fake_model(), "calib"), make_subset(cfg, fake_model(), "search")
    assert not set(calib.indices.tolist()) & set(search.indices.tolist())
    images, labels = next(iter(a.loader))
    assert images.shape == (10, 3, 32, 32) and labels.max() < 10


def test_search_subset_stays_disjoint_from_calibration_when_they_would_overlap():
    cfg = DataConfig(kind="synthetic", synthetic_size=40, calib_size=30, search_size=20, num_workers=0)
    calib, search = make_subset(cfg, fake_model(), "calib"), make_subset(cfg, fake_model(), "search")
    assert len(search) == 10 and not set(calib.indices.tolist()) & set(search.indices.tolist())
    with pytest.raises(PipelineError, match=r"the calibration uses all 40 images of split 'train': the search subset must be disjoint"):
        make_subset(DataConfig(kind="synthetic", synthetic_size=40, calib_size=0, num_workers=0), fake_model(), "search")


def test_calibration_and_evaluation_splits_may_not_share_images(tmp_path):
    from pipeline.data import check_calibration_split

    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "0.png").write_bytes(b"")
    check_calibration_split(DataConfig(root=str(tmp_path), calib_split="train", eval_split="test"))
    for calib in ("test", ".", str(tmp_path / "test")):
        with pytest.raises(PipelineError, match=f"data.calib_split='{calib}' and data.eval_split='test' share images"):
            check_calibration_split(DataConfig(root=str(tmp_path), calib_split=calib, eval_split="test"))
    with pytest.raises(PipelineError, match="data.calib_split='train' and data.eval_split='.' share images"):  # evaluation would read the calibration images
        check_calibration_split(DataConfig(root=str(tmp_path), calib_split="train", eval_split="."))
    with pytest.raises(PipelineError, match="share images"):
        check_calibration_split(DataConfig(kind="synthetic", calib_split="test", eval_split="test"))


def test_without_first_loads_the_rest_of_the_subset_in_order():
    cfg = DataConfig(kind="synthetic", synthetic_size=40, eval_size=10, batch_size=4, num_workers=0)
    subset = make_subset(cfg, fake_model(), "eval")
    rest = subset.without_first(3)
    assert torch.equal(rest.indices, subset.indices[3:]) and len(rest) == 7 and rest.key != subset.key
    whole = torch.cat([images for images, _ in subset.loader])
    assert torch.equal(torch.cat([images for images, _ in rest.loader]), whole[3:])
    assert rest.loader.batch_size == 4 and len(subset.without_first(10)) == 0


def test_oversized_subset_is_clamped_with_warning(caplog):
    cfg = DataConfig(kind="synthetic", synthetic_size=16, eval_size=1000, num_workers=0)
    with caplog.at_level(logging.WARNING):
        subset = make_subset(cfg, fake_model(), "eval")
    assert len(subset) == 16
    assert "data.eval_size=1000 is larger than the 16 images available" in caplog.text


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(PipelineError, match="data root not found"):
        make_subset(DataConfig(root=str(tmp_path / "nope")), fake_model(), "eval")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(PipelineError, match="is empty"):
        make_subset(DataConfig(root=str(tmp_path)), fake_model(), "eval")


@needs_assets
def test_cifar_subset_reads_real_images_with_alphabetical_labels():
    cfg = DataConfig(root=str(CIFAR), eval_size=20, batch_size=20, num_workers=0)
    subset = make_subset(cfg, fake_model(), "eval")
    assert subset.loader.dataset.dataset.classes[:3] == ["airplane", "automobile", "bird"]
    images, labels = next(iter(subset.loader))
    assert images.shape == (20, 3, 32, 32)
    assert len(set(labels.tolist())) > 3


def image_tree(root, classes=("a", "b"), per_class: int = 2, size: int = 32, split: str = "train"):
    """A small ImageFolder split of PNGs under root/split."""
    from PIL import Image

    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (10 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return root


def two_class_model() -> LoadedModel:
    model = fake_model()
    model.model.num_classes = 2
    return model


def test_splits_must_fit_the_model_and_each_other(tmp_path):
    root = image_tree(image_tree(tmp_path), split="test")
    cfg = DataConfig(root=str(root))
    check_splits(cfg, two_class_model(), ["train", "test"])
    # a hidden folder (.ipynb_checkpoints) is not a class: labels stay the folder order a=0, b=1
    image_tree(root, classes=(".ipynb_checkpoints",), split="train")
    check_splits(cfg, two_class_model(), ["train"])
    # nor are hidden files and folders inside a class: a notebook's checkpoint copies, macOS ._ files
    image_tree(root / "train", classes=(".ipynb_checkpoints",), split="a")
    (root / "train" / "b" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    labels = [int(y) for _, y in make_subset(DataConfig(root=str(root), eval_split="train", batch_size=4), two_class_model(), "eval").loader.dataset]
    assert sorted(labels) == [0, 0, 1, 1]
    assert split_size(cfg, "train") == 4
    with pytest.raises(PipelineError, match="has 2 class folders, model fake has 10 classes"):
        check_splits(cfg, fake_model(), ["train"])
    image_tree(root, classes=("c",), split="test")
    (root / "test" / "b").rename(root / "test" / "x")
    with pytest.raises(PipelineError, match="has 3 class folders"):
        check_splits(cfg, two_class_model(), ["test"])
    (root / "test" / "c" / "0.png").unlink(), (root / "test" / "c" / "1.png").unlink()
    with pytest.raises(PipelineError, match="class folder\\(s\\) without images: c"):
        check_splits(cfg, two_class_model(), ["test"])
    (root / "test" / "c").rmdir()
    with pytest.raises(PipelineError, match="'train' and 'test' name different class folders"):
        check_splits(cfg, two_class_model(), ["train", "test"])


def test_images_in_nested_folders_of_a_class_count(tmp_path):
    root = image_tree(tmp_path, classes=("a",))
    image_tree(root / "train" / "b", classes=("2024",))  # b holds only a subfolder of images, as ImageFolder allows
    check_splits(DataConfig(root=str(root)), two_class_model(), ["train"])


def test_card_models_need_images_of_their_input_size(tmp_path):
    from PIL import Image

    root = image_tree(tmp_path, size=64)
    with pytest.raises(PipelineError, match="is 64x64 pixels; model fake takes 32x32 images"):
        check_splits(DataConfig(root=str(root)), two_class_model(), ["train"])
    # check_splits reads one image; any other is checked as the loader reads it, and named
    root = image_tree(tmp_path / "mixed")
    Image.new("RGB", (40, 40)).save(root / "train" / "b" / "1.png")
    check_splits(DataConfig(root=str(root)), two_class_model(), ["train"])
    subset = make_subset(DataConfig(root=str(root), eval_split="train", batch_size=4), two_class_model(), "eval")
    with pytest.raises(PipelineError, match="b/1.png is 40x40 pixels; model fake takes 32x32 images"):
        list(subset.loader)


def test_an_unreadable_image_is_named(tmp_path):
    root = image_tree(tmp_path)
    (root / "train" / "b" / "1.png").write_bytes(b"not a png")
    subset = make_subset(DataConfig(root=str(root), eval_split="train", batch_size=4), two_class_model(), "eval")
    with pytest.raises(PipelineError, match="cannot read image .*b/1.png"):
        list(subset.loader)


def test_subset_key_changes_when_an_image_is_replaced(tmp_path):
    """The FP32 logits cache is keyed by the subset: new images under the same root and names must miss it."""
    import os

    root = image_tree(tmp_path)
    cfg = DataConfig(root=str(root), eval_split="train")
    before = make_subset(cfg, two_class_model(), "eval").key
    assert make_subset(cfg, two_class_model(), "eval").key == before
    image = root / "train" / "a" / "0.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert make_subset(cfg, two_class_model(), "eval").key != before


def test_search_subset_avoids_the_images_a_calibration_actually_used():
    cfg = DataConfig(kind="synthetic", synthetic_size=20, calib_size=4, search_size=0)
    order = seeded_order(20, cfg.seed, cfg.calib_split)
    # a calibration read from another run used 12 images, though data.calib_size says 4
    search = make_subset(cfg, fake_model(), "search", calib_images=12)
    assert set(search.indices.tolist()) == set(order[12:].tolist())


def test_a_state_calibrated_on_the_split_this_run_evaluates_is_refused(tmp_path):
    from pipeline.data import check_calibrated_elsewhere, data_source

    root = image_tree(image_tree(tmp_path), split="test")
    cfg = DataConfig(root=str(root))  # evaluates test
    meta = {"split": "test", "source": data_source(cfg)}  # an earlier run calibrated on test (it evaluated train)
    with pytest.raises(PipelineError, match="calibrated on the images of split 'test', which this run evaluates"):
        check_calibrated_elsewhere(meta, cfg, "the calibration in x")
    check_calibrated_elsewhere({**meta, "split": "train"}, cfg, "x")
    check_calibrated_elsewhere({**meta, "source": str(tmp_path / "elsewhere")}, cfg, "x")  # another data.root
    with pytest.raises(PipelineError, match="which this run evaluates"):
        check_calibrated_elsewhere({"split": "test"}, cfg, "x")  # no source recorded: this run's root
    synthetic = DataConfig(kind="synthetic")
    check_calibrated_elsewhere(meta, synthetic, "x")  # other images altogether
    with pytest.raises(PipelineError, match="which this run evaluates"):
        check_calibrated_elsewhere({"split": synthetic.eval_split, "source": data_source(synthetic)}, synthetic, "x")


def test_search_refuses_a_calibration_whose_split_has_changed_size(tmp_path):
    from pipeline.stages.calibrate import calibration_front

    root = image_tree(tmp_path, per_class=5)
    cfg = DataConfig(root=str(root), calib_split="train", seed=0)
    meta = {"split": "train", "seed": 0, "images": 4, "split_images": 10}
    assert calibration_front({"meta": meta}, cfg) == 4
    image_tree(root, classes=("a",), per_class=7)  # two more images: another permutation
    with pytest.raises(PipelineError, match="held 10 images; it now holds 12"):
        calibration_front({"meta": meta}, cfg)


def test_calibration_subset_is_the_seeded_front_of_the_calibration_split():
    cfg = DataConfig(kind="synthetic", synthetic_size=40, calib_size=8, eval_size=8, num_workers=0, batch_size=100)
    calib = make_subset(cfg, fake_model(), "calib")
    assert torch.equal(calib.indices, seeded_order(40, cfg.seed, cfg.calib_split)[:8])
    images, _ = next(iter(calib.loader))
    train = build_dataset(cfg, fake_model(), cfg.calib_split).tensors[0]
    test = build_dataset(cfg, fake_model(), cfg.eval_split).tensors[0]
    assert torch.equal(images, train[calib.indices])  # calibration reads the calibration split ...
    assert not any(torch.equal(img, t) for img in images for t in test)  # ... never an evaluation image


def test_subset_key_follows_the_transform():
    """The FP32 cache is keyed by the subset: another mean/std (a card's normalisation) must miss it."""
    cfg = DataConfig(kind="synthetic", synthetic_size=16, eval_size=8, num_workers=0)
    assert make_subset(cfg, fake_model(), "eval").key != make_subset(cfg, fake_model(mean=(0.4,) * 3), "eval").key


def test_hub_models_use_timms_deterministic_eval_transform():
    import timm
    from PIL import Image
    from torchvision import transforms as T

    from pipeline.data import build_transform

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=1)
    data_config = timm.data.resolve_data_config({}, model=model)
    loaded = LoadedModel(model, "hub", "vit_tiny_patch16_224", data_config, False, "0" * 16)
    transform = build_transform(loaded)
    kinds = [type(t) for t in transform.transforms]
    assert T.CenterCrop in kinds and T.RandomResizedCrop not in kinds and T.RandomHorizontalFlip not in kinds
    image = Image.fromarray((torch.rand(300, 260, 3) * 255).byte().numpy())
    a, b = transform(image), transform(image)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)


def test_fp32_cache_misses_for_another_model_subset_or_device(tmp_path, monkeypatch):
    from pipeline import inference

    class Net(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(float(k)))

        def forward(self, x):
            return x.flatten(1)[:, :10] * self.k

    cfg = DataConfig(kind="synthetic", synthetic_size=16, eval_size=8, num_workers=0)
    subset = make_subset(cfg, fake_model(), "eval")
    cpu = torch.device("cpu")
    one, _, hit = inference.fp32_logits(Net(1), "model-a", subset, cpu, tmp_path)
    assert not hit and inference.fp32_logits(Net(1), "model-a", subset, cpu, tmp_path)[2]
    two, _, hit = inference.fp32_logits(Net(2), "model-b", subset, cpu, tmp_path)
    assert not hit and torch.equal(two, 2 * one)  # another model: recomputed
    other = make_subset(DataConfig(**{**cfg.__dict__, "seed": 1}), fake_model(), "eval")  # same size, other images
    logits, _, hit = inference.fp32_logits(Net(1), "model-a", other, cpu, tmp_path)
    assert not hit and not torch.equal(logits, one)  # another subset
    monkeypatch.setattr(inference, "device_kind", lambda device: "cuda-Some-GPU")
    assert not inference.fp32_logits(Net(1), "model-a", subset, cpu, tmp_path)[2]  # another device kind
