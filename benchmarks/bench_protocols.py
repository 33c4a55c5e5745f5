"""Seconds per image of the two inference protocols on the same weights, same process: ours (``smt``: HAT+SE and
MambaIRv2+SE+MW with the demo profile's infer settings, then the fitted-weight fusion) and the authors' (``bbox``:
smt.infer.bbox_protocol.BBoxMethod). Random weights of the demo presets (hat_tiny, mambairv2_tiny), demo-size LR
images (<= 128 px); prints the bbox / smt ratio.

    PYTHONPATH=. python benchmarks/bench_protocols.py [--repeats 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_time  # noqa: E402

from smt.config import InferConfig, load_section  # noqa: E402
from smt.data.images import tensor_to_float255  # noqa: E402
from smt.infer.bbox_protocol import BBoxMethod  # noqa: E402
from smt.infer.fusion import fuse  # noqa: E402
from smt.infer.runner import model_outputs  # noqa: E402
from smt.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--params", default="profiles/demo.yaml")
    args = ap.parse_args()
    cfg: InferConfig = load_section("infer", args.params)
    torch.manual_seed(0)
    nets = {"hat": build_model("hat_tiny").eval(), "mambairv2": build_model("mambairv2_tiny").eval()}
    for net in nets.values():
        if hasattr(net, "routing"):
            net.routing = cfg.routing
    images = [torch.rand(1, 3, 75, 112), torch.rand(1, 3, 107, 128)]  # demo LR sizes (chelsea, rocket: <= 128)

    def ours() -> None:
        for x in images:
            best = [tensor_to_float255(list(model_outputs(n, x, m, cfg, 4, 0).values())[-1]) for m, n in nets.items()]
            fuse(best[0], best[1], 0.5)

    def theirs() -> None:
        method = BBoxMethod(dict(nets))
        for x in images:
            method.run(x)

    t_smt = median_time(ours, args.repeats) / len(images)
    t_bbox = median_time(theirs, args.repeats) / len(images)
    print(f"seconds per image (demo presets, {torch.get_num_threads()} threads): smt (every configuration) "
          f"{t_smt:.2f}, bbox {t_bbox:.2f}, "
          f"bbox / smt {t_bbox / t_smt:.2f}")


if __name__ == "__main__":
    main()
