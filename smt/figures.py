"""Figures for every stage's report, the shared plotting layer at the bottom of the package: small PNGs
(zoomed visual crops side by side, thumbnails, any figure saved at 80 dpi).

Importing this module selects no matplotlib backend: :func:`pyplot` selects the non-interactive Agg backend
when the first figure is drawn, so importing a stage's code never changes a notebook's or a session's
plotting setup."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["pyplot", "most_detailed_crop", "save_crop_grid", "save_thumbnails", "show_thumbnail", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` drawing with the Agg backend (files only, no window), selected on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save a figure as a small PNG (80 dpi) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    pyplot().close(fig)
    return path


def show_thumbnail(ax, image_path: str | Path, title: str, size: int = 160) -> None:
    """Draw an image file, shrunk to at most ``size`` px, with a small title."""
    from PIL import Image

    with Image.open(image_path) as im:
        im.thumbnail((size, size))
        ax.imshow(np.asarray(im.convert("RGB")))
    ax.set_title(title, fontsize=7)


def most_detailed_crop(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` x ``size`` window with the most gradient energy (deterministic)."""
    gray = hr.astype(np.float64).mean(axis=2)
    energy = np.abs(np.diff(gray, axis=0))[:, :-1] + np.abs(np.diff(gray, axis=1))[:-1, :]
    size = min(size, energy.shape[0], energy.shape[1])
    integral = np.pad(energy, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    top, left = np.unravel_index(np.argmax(sums), sums.shape)
    return int(top), int(left)


def save_crop_grid(path: str | Path, rows: list[tuple[str, Mapping[str, np.ndarray]]], crop_size: int,
                   scores: Mapping[tuple[str, str], float] | None = None) -> None:
    """One row per image, one column per method (HR first): the most detailed ``crop_size`` crop of each.

    ``rows`` holds ``(image_id, {method: uint8 image})``; ``scores[(image_id, method)]`` is printed as PSNR-Y.
    """
    methods = list(rows[0][1])
    fig, axes = pyplot().subplots(len(rows), len(methods), figsize=(2.2 * len(methods), 2.3 * len(rows)), squeeze=False)
    for r, (img_id, images) in enumerate(rows):
        top, left = most_detailed_crop(images[methods[0]], crop_size)
        for c, m in enumerate(methods):
            ax = axes[r][c]
            ax.imshow(images[m][top:top + crop_size, left:left + crop_size], interpolation="nearest")
            title = m if r == 0 else ""
            if scores and (img_id, m) in scores:
                title = f"{title}\n{scores[(img_id, m)]:.2f} dB" if title else f"{scores[(img_id, m)]:.2f} dB"
            ax.set_title(title, fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(img_id, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_thumbnails(root: str | Path, manifests: Mapping, path: str | Path, size: int = 160,
                    per_split: int = 12) -> Path:
    """A grid of the first ``per_split`` images of every split (HR, or LR where a split has no HR), titled
    ``split/id source WxH``."""
    entries = [(split, row) for split, df in manifests.items() for row in df.head(per_split).itertuples()]
    cols = min(6, max(1, len(entries)))
    nrows = -(-len(entries) // cols)
    fig, axes = pyplot().subplots(nrows, cols, figsize=(1.9 * cols, 2.1 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (split, row) in zip(axes.ravel(), entries):
        if row.hr_path:
            show_thumbnail(ax, Path(root) / row.hr_path,
                           f"{split}/{row.id} {row.source}\n{row.hr_width}x{row.hr_height}", size)
        else:
            show_thumbnail(ax, Path(root) / row.lr_path,
                           f"{split}/{row.id} {row.source}\nLR {row.lr_width}x{row.lr_height} (no HR)", size)
    fig.tight_layout()
    return save_figure(fig, path)
