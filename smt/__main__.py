"""Command line: ``python -m smt stage NAME`` (a DVC stage), ``train`` (one training stage; what ``torchrun``
launches), ``infer`` (the inference stage; shards images under ``torchrun``), ``evaluate SR_DIR HR_DIR`` (score
a folder the challenge's way), ``upscale`` (your images), ``pipeline`` (write dvc.yaml), ``profile NAME`` (switch
demo <-> ntire2025), ``check`` (dry run: what data, weights and GPUs are missing), ``smoke`` (first run on a GPU machine)."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_stage(args: argparse.Namespace) -> int:
    from smt.stages import run_stage

    html = run_stage(args.name, params_path=args.params)
    print(f"stage {args.name}: report at {html}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from smt.evaluate import evaluate_folder, get_protocol, summarize

    protocol = get_protocol(args.protocol)
    per_image = evaluate_folder(args.sr_dir, args.hr_dir, protocol)
    if args.csv:
        per_image.to_csv(args.csv, index=False)
    summary = summarize(per_image)
    print(per_image.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(json.dumps({"protocol": protocol.describe(), "num_images": len(per_image), **summary}, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from smt.config import load_section
    from smt.train.engine import train_stage

    data_cfg, cfg = load_section("data", args.params), load_section("train", args.params)
    result = train_stage(cfg, args.model, args.round, args.stage, data_cfg.root, data_cfg.scale,
                         max_steps=args.max_steps)
    print(json.dumps(result.__dict__, indent=2))
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from smt.config import load_section
    from smt.distributed import dist_info
    from smt.infer.runner import run_inference

    out = run_inference(load_section("infer", args.params), load_section("train", args.params),
                        load_section("data", args.params), args.out, params_path=args.params,
                        timings_path=args.timings)
    if dist_info()[0] == 0:
        print(json.dumps(out["timings"], indent=2))
    return 0


def _cmd_upscale(args: argparse.Namespace) -> int:
    import torch

    from smt.infer.upscale import collect_inputs, model_from_checkpoint, upscale_files

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    files = collect_inputs(args.inputs)
    net = model_from_checkpoint(args.checkpoint, args.model, args.device)
    summary = upscale_files(files, args.out, net, tile=args.tile, overlap=args.tile_overlap,
                            use_self_ensemble=args.self_ensemble, overwrite=args.overwrite,
                            precision="bf16" if args.bf16 else "fp32")
    for path, why in summary.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(f"wrote {len(summary.written)} image(s) to {args.out}")
    return 1 if summary.skipped else 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from smt.pipeline import write_dvc_yaml

    path = write_dvc_yaml(args.params, args.out)
    print(f"wrote {path}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from smt.profile import format_check, list_profiles, switch_profile

    if args.name is None:
        for name, path in list_profiles().items():
            print(f"{name}: {path}")
        return 0
    items, actions = switch_profile(args.name, dry_run=args.dry_run)
    print(format_check(items))
    for a in actions:
        print(a)
    return 1 if args.strict and any(i.status == "missing" for i in items) else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from smt.profile import check_params, format_check

    items = check_params(args.params)
    print(format_check(items))
    return 1 if args.strict and any(i.status == "missing" for i in items) else 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    from smt.smoke import format_rows, run_smoke

    rows = run_smoke(args.device, args.models, args.patch, args.batch)
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage", help="run one pipeline stage's notebook (what dvc repro calls)")
    p.add_argument("name")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_cmd_stage)
    p = sub.add_parser("evaluate", help="score a folder of SR images against HR images (challenge protocol)")
    p.add_argument("sr_dir")
    p.add_argument("hr_dir")
    p.add_argument("--protocol", default="NTIRE2025", choices=["NTIRE2025", "BasicSR"])
    p.add_argument("--csv", help="also write the per-image scores here")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("train", help="train one (model, round, stage); runs under torchrun as well")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--model", required=True)
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--stage", required=True)
    p.add_argument("--max-steps", type=int, help="stop (and save) after this many steps in total")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("infer", help="the infer stage without its notebook; shards images under torchrun")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="results")
    p.add_argument("--timings", help="also write seconds per image and peak memory per method here (JSON)")
    p.set_defaults(func=_cmd_infer)
    p = sub.add_parser("upscale", help="super-resolve your images with a checkpoint")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder (written as <name>x4.png)")
    p.add_argument("--checkpoint", required=True, help="official .pth or our model.safetensors")
    p.add_argument("--model", help="preset (hat_l, mambairv2_l, ...); optional for our own checkpoints")
    p.add_argument("--tile", type=int, default=0, help="LR tile size for bounded memory (0 = whole image)")
    p.add_argument("--tile-overlap", type=int, default=8)
    p.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble (8x slower)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on GPUs and CPUs with native bf16)")
    p.set_defaults(func=_cmd_upscale)
    p = sub.add_parser("pipeline", help="write dvc.yaml from params.yaml (models, rounds, stages)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="dvc.yaml")
    p.set_defaults(func=_cmd_pipeline)
    p = sub.add_parser("profile", help="switch params.yaml (and dvc.yaml) to profiles/NAME.yaml; no NAME: list")
    p.add_argument("name", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="only check the profile: config, data, weights, GPUs")
    p.add_argument("--strict", action="store_true", help="exit 1 when something is missing")
    p.set_defaults(func=_cmd_profile)
    p = sub.add_parser("check", help="dry run of the active params: what data, weights and GPUs are missing")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--strict", action="store_true", help="exit 1 when something is missing")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("smoke", help="GPU smoke check: kernels vs reference, one train step and one tiled "
                                     "inference per model")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="large", choices=["large", "tiny"])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.set_defaults(func=_cmd_smoke)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
