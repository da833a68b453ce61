"""Data: ImageFolder or synthetic datasets and fixed, seeded subsets.

Subsets are prefixes of one seeded permutation per split, so a subset of 500
images is the first 500 of the same order as a subset of 1,000. From the
calibration split, calibration takes the front of the permutation and the search
subset takes the back, so the two never overlap.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.models import LoadedModel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataSubset:
    """A fixed subset of one split: the loader plus an identity for caches."""

    split: str
    indices: torch.Tensor  # (n,) int64, in loading order
    loader: DataLoader
    key: str  # identifies (source, split, indices, transform)

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def split_images(self) -> int:
        """Images in the whole split (the seeded permutation's length), from the loader's dataset."""
        return len(self.loader.dataset.dataset)  # subset_loader's Subset over the split

    def without_first(self, n: int) -> "DataSubset":
        """The same subset less its first `n` images (loading order; same batch size and workers).

        For a stage that already ran those images another way (evaluate's profiled images).
        The key names the shorter subset, so caches never mix the two.
        """
        rest = self.indices[n:]
        split = self.loader.dataset.dataset  # subset_loader's Subset: indices refer to the whole split
        loader = subset_loader(split, rest, self.loader.batch_size, self.loader.num_workers)
        return DataSubset(self.split, rest, loader, f"{self.key}-from{n}")


def build_transform(loaded: LoadedModel):
    """Card models: ToTensor + Normalize(mean, std), no resize. Hub models: timm's eval transform."""
    from torchvision import transforms as T

    cfg = loaded.data_config
    if loaded.plain_transform:
        return T.Compose([T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
    import timm.data

    return timm.data.create_transform(**cfg, is_training=False)


def split_dir(cfg: DataConfig, split: str) -> Path:
    """`root/split`; `split` may be '.' (the root itself) or an absolute path."""
    if not cfg.root:
        raise PipelineError("data.root is not set (data=imagefolder needs data.root=/path/to/images)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise PipelineError(f"data root not found: {root}")
    path = root / split
    if not path.is_dir():
        raise PipelineError(f"split folder '{split}' not found under data root {root}")
    classes = class_names(path)
    empty = [c for c in classes if next(image_files(path / c), None) is None]
    if len(empty) == len(classes):
        raise PipelineError(f"data split {path} is empty (expected one folder of images per class)")
    if empty:
        raise PipelineError(f"data split {path}: class folder(s) without images: {', '.join(empty[:5])}")
    return path


def is_hidden(relative: Path) -> bool:
    """True when a path below a split holds a hidden part (.ipynb_checkpoints/, macOS ._x.png): not data."""
    return any(part.startswith(".") for part in relative.parts)


def image_files(folder: Path) -> Iterator[Path]:
    """The image files under a class folder, nested too (as ImageFolder), hidden ones left out (unsorted)."""
    return (f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(f.relative_to(folder)))


def class_names(path: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted (label order); hidden folders (.ipynb_checkpoints) are not classes."""
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def check_splits(cfg: DataConfig, loaded: LoadedModel, splits: list[str]) -> None:
    """Before any run opens: each split has one folder per model class, the splits name the same classes
    (labels are folder indices), and card models (fed without resizing) get images of their input size."""
    if cfg.kind != "imagefolder":
        return
    first: tuple[str, list[str]] | None = None
    for split in dict.fromkeys(splits):
        path = split_dir(cfg, split)
        classes = class_names(path)
        if len(classes) != loaded.num_classes:
            raise PipelineError(f"data split {path} has {len(classes)} class folders, model {loaded.name} has {loaded.num_classes} classes")
        if first is not None and classes != first[1]:
            raise PipelineError(f"data splits '{first[0]}' and '{split}' name different class folders: labels would not match")
        first = first or (split, classes)
        if loaded.plain_transform:
            _check_image_size(path / classes[0], tuple(loaded.data_config["input_size"][1:]), loaded.name)


def _check_image_size(class_dir: Path, size: tuple[int, int], model: str) -> None:
    from PIL import Image

    image = min(image_files(class_dir))
    with Image.open(image) as im:
        height_width = (im.height, im.width)
    if height_width != size:
        raise PipelineError(_wrong_size(image, height_width, size, model))


def check_calibration_split(cfg: DataConfig) -> None:
    """Calibration and search must never read the evaluation images: the calibration split may not be the
    evaluation split or contain it (e.g. data.calib_split=. with the evaluation split under the root)."""
    if cfg.kind == "imagefolder" and not cfg.root:
        return  # split_dir names the missing data.root
    if _splits_share_images(data_source(cfg), cfg.calib_split, cfg):
        raise PipelineError(f"data.calib_split='{cfg.calib_split}' and data.eval_split='{cfg.eval_split}' share images: calibration and search use other images than evaluation")


def check_calibrated_elsewhere(meta: Mapping[str, Any], cfg: DataConfig, where: str) -> None:
    """A state calibrated in an earlier run (`meta`: its index's meta) must not have drawn its images from
    the split this run evaluates: that run may have evaluated elsewhere (data.calib_split=test is allowed
    with data.eval_split=train). States that do not record their split cannot be checked."""
    split = meta.get("split")
    if split is None or (cfg.kind == "imagefolder" and not cfg.root):
        return
    source = meta.get("source", data_source(cfg))  # states made before the source was recorded: this run's
    if _splits_share_images(source, split, cfg):
        raise PipelineError(f"{where} was calibrated on the images of split '{split}', which this run evaluates on (data.eval_split='{cfg.eval_split}'): calibrate on other images")


def data_source(cfg: DataConfig) -> str:
    """Where a split's images come from: the resolved data.root, or synthetic/<synthetic_size>."""
    return f"synthetic/{cfg.synthetic_size}" if cfg.kind == "synthetic" else str(Path(cfg.root).resolve())


def _splits_share_images(source: str, split: str, cfg: DataConfig) -> bool:
    """Whether split `split` of `source` is this run's evaluation split, or a folder containing it or inside it."""
    if source != data_source(cfg) and (cfg.kind == "synthetic" or source.startswith("synthetic/")):
        return False
    if cfg.kind == "synthetic":
        return split == cfg.eval_split
    calib, evaluation = (Path(source) / split).resolve(), (Path(cfg.root) / cfg.eval_split).resolve()
    return calib == evaluation or calib in evaluation.parents or evaluation in calib.parents


def build_dataset(cfg: DataConfig, loaded: LoadedModel, split: str) -> Dataset:
    if cfg.kind == "synthetic":
        g = torch.Generator().manual_seed(hash_int(f"{cfg.seed}/{split}"))
        c, h, w = loaded.data_config["input_size"]
        images = torch.randn(cfg.synthetic_size, c, h, w, generator=g)
        labels = torch.randint(0, loaded.num_classes, (cfg.synthetic_size,), generator=g)
        return TensorDataset(images, labels)
    if cfg.kind != "imagefolder":
        raise PipelineError(f"unknown data.kind '{cfg.kind}' (imagefolder or synthetic)")
    # card models take their images as they are: each image is checked as it is read (check_splits saw one)
    size = tuple(loaded.data_config["input_size"][1:]) if loaded.plain_transform else None
    return _image_folder(split_dir(cfg, split), build_transform(loaded), functools.partial(_load_image, size=size, model=loaded.name))


def _image_folder(path: Path, transform=None, loader=None) -> Dataset:
    try:
        return _ImageFolder(str(path), transform=transform, loader=loader or _load_image)
    except FileNotFoundError as e:  # a class folder without images of a known type
        raise PipelineError(f"data split {path}: {e}") from None


def _load_image(file: str, size: tuple[int, int] | None = None, model: str = ""):
    """The RGB image in `file`; with `size` (height, width), an image of another size is an error."""
    try:
        image = default_loader(file)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise PipelineError(f"cannot read image {file}: {e}") from None
    if size is not None and (image.height, image.width) != size:
        raise PipelineError(_wrong_size(file, (image.height, image.width), size, model))
    return image


def _wrong_size(file, height_width: tuple[int, int], size: tuple[int, int], model: str) -> str:
    return f"{file} is {height_width[0]}x{height_width[1]} pixels; model {model} takes {size[0]}x{size[1]} images as they are (no resize)"


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden folders as classes (labels are indices into class_names)
    and without hidden files or folders inside a class (a notebook's checkpoint copies, macOS ._ files)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_names(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list[tuple[str, int]]:
        samples = ImageFolder.make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        return [(file, label) for file, label in samples if not is_hidden(Path(file).relative_to(directory))]


def split_size(cfg: DataConfig, split: str) -> int:
    """Number of images in a split (synthetic: data.synthetic_size), without decoding any."""
    if cfg.kind == "synthetic":
        return int(cfg.synthetic_size)
    return len(_image_folder(split_dir(cfg, split)).samples)


def seeded_order(n: int, seed: int, split: str) -> torch.Tensor:
    """A fixed permutation of range(n) for (seed, split)."""
    g = torch.Generator().manual_seed(hash_int(f"{seed}/{split}"))
    return torch.randperm(n, generator=g)


def clamp_size(size: int, available: int, what: str, warn: bool = True) -> int:
    """0 = all; a size larger than what is available is clamped (with a warning unless `warn` is False)."""
    if size < 0:
        raise PipelineError(f"{what} must be >= 0, got {size}")
    if size == 0:
        return available
    if size > available:
        if warn:
            log.warning("%s=%d is larger than the %d images available; using %d", what, size, available, available)
        return available
    return size


def make_subset(cfg: DataConfig, loaded: LoadedModel, purpose: str, calib_images: int | None = None) -> DataSubset:
    """purpose: 'calib' (front of calib_split), 'search' (back of calib_split) or 'eval'.

    `calib_images` (search): how many images at the front the calibration actually used (a calibration
    read from another run may have used another data.calib_size); default: data.calib_size.
    """
    split = cfg.eval_split if purpose == "eval" else cfg.calib_split
    dataset = build_dataset(cfg, loaded, split)
    order = seeded_order(len(dataset), cfg.seed, split)
    if purpose == "eval":
        indices = order[: clamp_size(cfg.eval_size, len(order), "data.eval_size")]
    elif purpose == "calib":
        indices = order[: clamp_size(cfg.calib_size, len(order), "data.calib_size")]
    elif purpose == "search":  # from the back of the permutation, never reaching the calibration images
        used = clamp_size(cfg.calib_size, len(order), "data.calib_size", warn=False) if calib_images is None else calib_images
        indices = order.flip(0)[: clamp_size(cfg.search_size, search_room(len(order), used, split), "data.search_size")]
    else:
        raise ValueError(f"unknown subset purpose '{purpose}'")
    if indices.numel() == 0:
        raise PipelineError(f"the {purpose} subset of split '{split}' is empty")
    loader = subset_loader(dataset, indices, cfg.batch_size, cfg.num_workers)
    digest = hashlib.sha1(f"{data_source(cfg)}|{split}|{loaded.data_config}|{cfg.seed}".encode() + indices.numpy().tobytes())
    if cfg.kind == "imagefolder":
        _hash_files(digest, dataset, indices)
    return DataSubset(split, indices, loader, digest.hexdigest()[:16])


def _hash_files(digest, dataset, indices: torch.Tensor) -> None:
    """Add the chosen images' paths, labels, sizes and modification times to `digest`, so that caches keyed
    by the subset (FP32 logits) see images replaced or class folders renamed under the same root."""
    for i in indices.tolist():
        file, label = dataset.samples[i]
        stat = os.stat(file)
        digest.update(f"{file}|{label}|{stat.st_size}|{stat.st_mtime_ns};".encode())


def search_room(split_images: int, calib_images: int, split: str) -> int:
    """Images of the calibration split left for the search subset behind the `calib_images` the calibration
    takes from the front of its permutation; an error when none are left."""
    if calib_images >= split_images:
        raise PipelineError(f"the calibration uses all {split_images} images of split '{split}': the search subset must be disjoint from them, lower data.calib_size")
    return split_images - calib_images


def subset_loader(dataset: Dataset, indices: torch.Tensor, batch_size: int, num_workers: int) -> DataLoader:
    """A loader over `dataset[indices]`, in that order."""
    return DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers, persistent_workers=False)


def hash_int(text: str) -> int:
    """A stable 63-bit integer from a string (Python's hash() is salted per process)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)
