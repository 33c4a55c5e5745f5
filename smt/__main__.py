"""Command line: ``python -m smt stage NAME`` (a DVC stage) and ``python -m smt evaluate SR_DIR HR_DIR``."""
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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
