"""Paired LR/HR patches for training, with crop positions and augmentations drawn by a seeded sampler.

The sampler draws every random choice of a *global* batch (image, crop corner, flips, transpose) from a
generator seeded by ``(seed, step)``; each DDP rank takes its slice of the batch. So the data is a function of
the step alone: independent of the number of loader workers and processes, unaffected by prefetching, and a
run resumed at step k sees exactly the batches an uninterrupted run sees. The dataset only applies those
choices to images it decodes on demand (a small per-process cache keeps the recently used ones), or, given a
prepared store (``data.store``, :mod:`smt.data.prepare`), to memory maps of the images' uncompressed arrays:
the same pixels, so the same patches, without decoding a 2K PNG per patch (docs/data_loading.md). Colour
augmentations (``train.augment``, :mod:`smt.data.augment`) are drawn after the crops and flips from the same
generator, so with them off the draws are those of the paper's recipe.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from smt.config import AugmentSpec
from smt.data.augment import PERMUTATIONS, color_matrix, degrade_patch
from smt.data.images import read_image
from smt.data.manifest import read_manifest
from smt.data.prepare import load_array, open_store
from smt.seeds import sampler_step_seed

__all__ = ["PatchSpec", "PairedPatchDataset", "GlobalBatchSampler", "cut_patch", "read_subset"]


@dataclass(frozen=True)
class PatchSpec:
    image: int
    top: int  # LR pixels
    left: int
    hflip: bool
    vflip: bool
    transpose: bool  # with the flips: all 8 dihedral transforms (90-degree rotations included)
    channels: tuple[int, int, int] = (0, 1, 2)  # output channel c is input channel channels[c]
    color: tuple[float, float] | None = None  # (hue degrees, saturation) of a colour matrix; None = no matrix


def augment(x: torch.Tensor, spec: PatchSpec) -> torch.Tensor:
    """Apply ``spec``'s flips/transpose to a (C, H, W) tensor."""
    if spec.hflip:
        x = x.flip(-1)
    if spec.vflip:
        x = x.flip(-2)
    if spec.transpose:
        x = x.transpose(-1, -2)
    return x


def _chw(hwc: np.ndarray) -> torch.Tensor:
    """A (3, h, w) tensor holding a copy of an (h, w, 3) array (or of the slice of a memory map)."""
    return torch.from_numpy(np.array(hwc)).permute(2, 0, 1)


def cut_patch(lr_img: torch.Tensor | np.ndarray, hr_img: torch.Tensor | np.ndarray, spec: PatchSpec,
              patch_size: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (LR, HR) training pair, float in [0, 1], that ``spec`` cuts from uint8 LR and HR images: crop, colour
    transform, channel order, then flips/transpose. The images are (3, H, W) tensors (decoded PNGs) or (H, W, 3)
    arrays (a prepared store's memory maps, of which only the crop is read); both give the same pair."""
    p, s = patch_size, scale
    y, x = spec.top, spec.left
    hwc = isinstance(lr_img, np.ndarray)
    if spec.color is None:
        if hwc:
            lr, hr = _chw(lr_img[y:y + p, x:x + p]), _chw(hr_img[s * y:s * (y + p), s * x:s * (x + p)])
        else:
            lr, hr = lr_img[:, y:y + p, x:x + p], hr_img[:, s * y:s * (y + p), s * x:s * (x + p)]
    else:  # the LR is re-made from the colour-transformed HR (exactly what degrading the whole image gives)
        lr_np, hr_np = degrade_patch(hr_img if hwc else hr_img.permute(1, 2, 0).numpy(), y, x, p, s,
                                     color_matrix(*spec.color))
        lr, hr = _chw(lr_np), _chw(hr_np)
    if spec.channels != (0, 1, 2):
        lr, hr = lr[list(spec.channels)], hr[list(spec.channels)]
    return augment(lr, spec).float() / 255.0, augment(hr, spec).float() / 255.0


def read_subset(path: str | Path) -> list[str]:
    """Image ids listed in a selection manifest (column ``id``), in rank order."""
    df = pd.read_csv(path, dtype={"id": str})
    if "id" not in df.columns:
        raise ValueError(f"{path}: a subset manifest needs an 'id' column")
    return df["id"].tolist()


class PairedPatchDataset(Dataset):
    """(LR patch ``p x p``, HR patch ``sp x sp``) pairs from a data split, aligned.

    Images are read lazily: the constructor keeps only paths and sizes (from the manifest, or the image header
    where the manifest has none) and checks them; ``__getitem__`` decodes the image its patch comes from and
    keeps the last ``cache_images`` decoded LR/HR pairs (least recently used first out) in this process. So the
    resident memory is bounded by the cache, not the split's size, and each DataLoader worker holds its own.

    With ``store`` (a folder :func:`smt.data.prepare.prepare_store` wrote from this root), nothing is decoded:
    the cache holds memory maps of the stored arrays and a patch reads only the rows and columns it covers. The
    store is checked against the manifest when the dataset is built."""

    def __init__(self, root: str | Path, split: str, patch_size: int, scale: int,
                 subset: Sequence[str] | None = None, cache_images: int = 32, store: str | Path | None = None) -> None:
        if cache_images < 1:
            raise ValueError(f"cache_images must be >= 1, got {cache_images}")
        manifest = read_manifest(root, split)
        if subset is not None:
            missing = sorted(set(subset) - set(manifest["id"]))
            if missing:
                raise ValueError(f"subset names {len(missing)} images not in the {split} manifest, e.g. {missing[:3]}")
            manifest = manifest.set_index("id").loc[list(subset)].reset_index()
        if manifest.empty:
            raise ValueError(f"no training images in {root} split {split!r}")
        self.root, self.patch_size, self.scale, self.cache_images = Path(root), patch_size, scale, cache_images
        self.ids = manifest["id"].tolist()
        self.lr_paths: list[str] = manifest["lr_path"].tolist()
        self.hr_paths: list[str] = manifest["hr_path"].tolist()
        self.lr_sizes: list[tuple[int, int]] = []
        self.hr_sizes: list[tuple[int, int]] = []
        for i, row in enumerate(manifest.to_dict("records")):
            lr, hr = _manifest_size(self.root, row, "lr"), _manifest_size(self.root, row, "hr")
            if hr != (lr[0] * scale, lr[1] * scale):
                raise ValueError(f"{row['hr_path']}: HR {hr} is not x{scale} of LR {lr}")
            if min(lr) < patch_size:
                raise ValueError(f"{row['lr_path']}: LR {lr[1]}x{lr[0]} is smaller than the patch size {patch_size}")
            self.lr_sizes.append(lr)
            self.hr_sizes.append(hr)
        self.store = Path(store) if store else None
        self.lr_arrays, self.hr_arrays = open_store(self.store, manifest) if self.store else ([], [])
        self._cache: OrderedDict[int, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self.ids)

    def sizes(self) -> list[tuple[int, int]]:
        """LR (height, width) per image, as the sampler needs them."""
        return list(self.lr_sizes)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # a spawned DataLoader worker starts with an empty cache
        return state

    def images(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
        """Image ``index`` as (LR, HR) uint8 (3, H, W) tensors, from the cache or decoded now; with a store,
        as (H, W, 3) memory maps."""
        pair = self._cache.get(index)
        if pair is not None:
            self._cache.move_to_end(index)
            return pair
        read = self._map if self.store else self._decode
        pair = tuple(read(index, kind) for kind in ("lr", "hr"))
        self._cache[index] = pair
        while len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)
        return pair

    def _decode(self, index: int, kind: str) -> torch.Tensor:
        path = self.root / (self.lr_paths if kind == "lr" else self.hr_paths)[index]
        img = read_image(path)
        expected = (self.lr_sizes if kind == "lr" else self.hr_sizes)[index]
        if img.shape[:2] != expected:
            raise ValueError(f"{path}: image is {img.shape[1]}x{img.shape[0]} but the manifest says "
                             f"{expected[1]}x{expected[0]}; rerun the data stage")
        return torch.from_numpy(img).permute(2, 0, 1).contiguous()

    def _map(self, index: int, kind: str) -> np.ndarray:
        path = (self.lr_arrays if kind == "lr" else self.hr_arrays)[index]
        try:
            arr = load_array(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing from the prepared store; rerun the prepare stage "
                                    "(dvc repro -f prepare)") from None
        expected = (self.lr_sizes if kind == "lr" else self.hr_sizes)[index]
        if arr.shape[:2] != expected:
            raise ValueError(f"{path}: array is {arr.shape[1]}x{arr.shape[0]} but the manifest says "
                             f"{expected[1]}x{expected[0]}; rerun the prepare stage")
        return arr

    def __getitem__(self, spec: PatchSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return cut_patch(*self.images(spec.image), spec, self.patch_size, self.scale)


def _manifest_size(root: Path, row: dict, kind: str) -> tuple[int, int]:
    """(height, width) of a manifest row's ``kind`` image: the manifest's columns, or the file's header where
    they are absent or empty (older manifests)."""
    h, w = row.get(f"{kind}_height"), row.get(f"{kind}_width")
    try:
        if h not in (None, "") and w not in (None, ""):
            return int(h), int(w)
    except (TypeError, ValueError):
        pass
    path = root / row[f"{kind}_path"]
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: cannot read the image size ({exc})") from None


class GlobalBatchSampler(Sampler):
    """Yields this rank's list of :class:`PatchSpec` for each step from ``start_step`` on, forever."""

    def __init__(self, sizes: Sequence[tuple[int, int]], patch_size: int, global_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1, augment: AugmentSpec = AugmentSpec(),
                 start_step: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.sizes, self.patch_size, self.global_batch = list(sizes), patch_size, global_batch
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
        self.start_step = start_step

    def draw(self, step: int) -> list[PatchSpec]:
        g = torch.Generator().manual_seed(sampler_step_seed(self.seed, step))
        p, n = self.patch_size, self.global_batch
        images = torch.randint(len(self.sizes), (n,), generator=g).tolist()
        corners = torch.rand(n, 2, generator=g).tolist()
        aug = self.augment
        flips = torch.randint(2, (n, 3), generator=g).tolist() if aug.dihedral else [[0, 0, 0]] * n
        channels = [PERMUTATIONS[k] for k in torch.randint(6, (n,), generator=g).tolist()] \
            if aug.channel_permute else [PERMUTATIONS[0]] * n
        colors: list[tuple[float, float] | None] = [None] * n
        if aug.color_prob > 0:
            low, high = aug.saturation
            colors = [((2 * u1 - 1) * aug.hue_degrees, low + u2 * (high - low)) if u0 < aug.color_prob else None
                      for u0, u1, u2 in torch.rand(n, 3, generator=g, dtype=torch.float64).tolist()]
        specs = []
        for i, ((fy, fx), (hf, vf, tr)) in enumerate(zip(corners, flips)):
            h, w = self.sizes[images[i]]
            specs.append(PatchSpec(images[i], int(fy * (h - p + 1)), int(fx * (w - p + 1)), bool(hf), bool(vf),
                                   bool(tr), channels[i], colors[i]))
        per_rank = n // self.world_size
        return specs[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[PatchSpec]]:
        step = self.start_step
        while True:
            yield self.draw(step)
            step += 1


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    lr, hr = zip(*batch)
    return torch.stack(lr), torch.stack(hr)


