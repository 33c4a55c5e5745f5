"""The infer stage's use of the authors' protocol (:mod:`smt.infer.bbox_protocol`) beside ours.

After the stage has written our outputs, :func:`bbox_pass` runs their whole method on the same final models:
- ``infer.protocol: bbox``: their fused images replace ``results/<split>/fused/`` on both splits (the method's
  output follows their protocol; the per-model configurations and ``fusion.json`` stay ours);
- ``infer.compare_protocols``: both protocols' fused PSNR-Y on the test split go to ``results/protocols.json``
  (tracked: deterministic, byte-identical on rerun); their seconds per image go to the stage's timings file only
  (wall clock never enters ``results/``).
One process only (their Gumbel stream runs across the images in order: it cannot be sharded the way ours is).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from smt.config import DataConfig, InferConfig
from smt.data.images import image_to_tensor, read_image, write_png
from smt.data.manifest import has_hr
from smt.infer.bbox_protocol import BBoxMethod, fuse_bbox
from smt.metrics import NTIRE2025, evaluate_pair

__all__ = ["bbox_pass", "PROTOCOLS_JSON"]

PROTOCOLS_JSON = "protocols.json"


def bbox_pass(nets: dict[str, torch.nn.Module], cfg: InferConfig, data_cfg: DataConfig,
              splits: dict[str, pd.DataFrame], results_dir: Path, log: Callable[[str], None] = print
              ) -> dict[str, float] | None:
    """Their method on ``splits`` (see the module docstring); returns ``{"seconds_per_image": ...}`` of their
    fused output (the stage's timings), or ``None`` when neither ``infer.protocol: bbox`` nor
    ``infer.compare_protocols`` asks for it."""
    replace = cfg.protocol == "bbox"
    if not replace and not cfg.compare_protocols:
        return None
    method = BBoxMethod({m: nets[m] for m in cfg.models})
    scale, root = data_cfg.scale, Path(data_cfg.root)
    compare = cfg.compare_protocols and "test" in splits and has_hr(splits["test"])
    scores: dict[str, list[float]] = {"smt": [], "bbox": []}
    seconds, images = 0.0, 0
    for split in (["valid", "test"] if replace else ["test"]):  # their order: one stream across the images
        for row in splits[split].itertuples():
            x = image_to_tensor(read_image(root / row.lr_path), method.device)
            t = time.perf_counter()
            outs = list(method.outputs(x).values())
            fused = outs[0] if len(outs) == 1 else fuse_bbox(outs[0], outs[1])
            seconds, images = seconds + time.perf_counter() - t, images + 1
            target = results_dir / split / "fused" / f"{row.id}x{scale}.png"
            if split == "test" and compare:
                hr = read_image(root / row.hr_path)
                scores["smt"].append(evaluate_pair(read_image(target), hr, NTIRE2025)["psnr_y"])
                scores["bbox"].append(evaluate_pair(fused, hr, NTIRE2025)["psnr_y"])
            if replace:
                write_png(target, fused)
    path = results_dir / PROTOCOLS_JSON
    path.unlink(missing_ok=True)
    if compare:
        table = {"split": "test", "images": len(scores["bbox"]), "evaluation": NTIRE2025.describe(),
                 "method": "fused", "psnr_y": {p: float(np.mean(v)) for p, v in scores.items()}}
        path.write_text(json.dumps(table, indent=2) + "\n")
        log("protocols on the test split (fused PSNR-Y): " + ", ".join(f"{p} {v:.3f} dB"
                                                                        for p, v in table["psnr_y"].items()))
    return {"seconds_per_image": seconds / max(1, images)}
