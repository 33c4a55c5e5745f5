"""Command line (``smt`` or ``python -m smt``): ``stage NAME`` (a DVC stage), ``train`` (one training stage;
what ``torchrun`` launches), ``infer`` (the inference stage; shards images under ``torchrun``), ``evaluate SR_DIR
HR_DIR`` (score a folder the challenge's way), ``upscale`` (your images; the pipeline's method by default),
``export`` (weights for other tools, or the method as a bundle), ``benchmark`` (a checkpoint on the SR test
sets), ``pipeline`` (write dvc.yaml), ``profile NAME`` (switch demo <-> ntire2025), ``check`` (dry run: what
data, weights and GPUs are missing), ``smoke`` (first run on a GPU machine), ``rehearse [PROFILE]`` (dress
rehearsal: one round of a profile's real stages, reduced counts, in a scratch folder)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def _check_names(flag: str, what: str, given: list[str], valid) -> None:
    """Refuse ``what`` names not in ``valid`` before any work, saying what was given and what is valid."""
    unknown = [n for n in given if n not in valid]
    if unknown:
        raise ValueError(f"{flag}: unknown {what} {', '.join(map(repr, unknown))} (valid: {', '.join(valid)})")
    if not given:
        raise ValueError(f"{flag}: no {what} given (valid: {', '.join(valid)})")


def _presets() -> list[str]:
    from smt.models.presets import PRESETS

    return list(PRESETS)


def _benchmark_sets() -> list[str]:
    from smt.config import BENCHMARK_SETS

    return list(BENCHMARK_SETS)


def _cmd_train(args: argparse.Namespace) -> int:
    from smt.config import load_section
    from smt.train.engine import PREEMPTED_EXIT_CODE, Preempted, train_stage

    data_cfg, cfg = load_section("data", args.params), load_section("train", args.params)
    try:
        result = train_stage(cfg, args.model, args.round, args.stage, data_cfg.root, data_cfg.scale,
                             max_steps=args.max_steps, store=data_cfg.store)
    except Preempted as exc:  # a scheduler's signal: the state is saved at the current step; rerun to resume
        print(f"preempted: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
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


def _tile_arg(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer, got {value!r}") from None


def _keep_freed_memory_on_cpu(device: str) -> None:
    if device == "cpu":
        from smt.infer.malloc import keep_freed_memory

        keep_freed_memory()  # large activations reuse heap memory instead of fresh pages (the module says why)


def _cmd_upscale(args: argparse.Namespace) -> int:
    import torch

    from smt.infer import upscale as up
    from smt.models import load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    from smt.infer.bbox_protocol import BBoxMethod, check_protocol

    checkpoints = args.checkpoint or []
    protocol = None if args.protocol is None else check_protocol(args.protocol, "--protocol")
    if checkpoints and args.bundle:
        raise ValueError("--checkpoint and --bundle: give one of them (or neither, for the pipeline's method)")
    if args.model is not None:
        _check_names("--model", "preset", [args.model], _presets())
    if len(checkpoints) > 2 or (len(checkpoints) == 2 and protocol != "bbox"):
        raise ValueError("--checkpoint: one model, or two fused by the authors' protocol (--protocol bbox); "
                         f"got {len(checkpoints)}")
    if protocol == "bbox" and (args.tile is not None or args.self_ensemble or args.bf16):
        raise ValueError("--protocol bbox: their protocol fixes its ensemble, tiling and precision (fp32); "
                         "drop --tile, --self-ensemble and --bf16")
    inputs = [*args.inputs, *(args.input or [])]
    if not inputs:
        raise ValueError("-i/--input: no input images or folders given")
    up.check_settings(args.tile if args.tile is not None else 0, args.tile_overlap, args.out)
    scan = up.scan_inputs(inputs)
    if scan.skipped:
        print(f"upscale: {scan.describe_skipped()}", file=sys.stderr)
    _keep_freed_memory_on_cpu(args.device)
    if checkpoints and protocol == "bbox":  # the authors' released pair: HAT and MambaIRv2, fused
        from pathlib import Path

        runner = BBoxMethod({Path(c).stem: load_model(c, args.model if len(checkpoints) == 1 else None,
                                                      args.device) for c in checkpoints})
        tile = None
    elif checkpoints:
        from smt.infer.precision import choose_precision

        precision, why = choose_precision(args.bf16, args.device)  # fp32 unless --bf16; says why
        print(f"upscale: {why}", file=sys.stderr)
        runner = up.SingleModel(load_model(checkpoints[0], args.model, args.device, routing="argmax"),
                                tile=0, overlap=args.tile_overlap, use_self_ensemble=args.self_ensemble,
                                precision=precision)
        tile = args.tile if args.tile is not None else 0
    else:
        if args.model or args.self_ensemble or args.bf16:
            raise ValueError("--model, --self-ensemble and --bf16 apply to --checkpoint only (the method's "
                             "settings come from the infer section or the bundle)")
        runner = (up.method_from_bundle(args.bundle, args.device) if args.bundle
                  else up.method_from_run(args.params, args.results, args.device))
        tile = args.tile  # None: the method's own infer.tile
        if (protocol or runner.cfg.protocol) == "bbox":  # --protocol, else the run's infer.protocol
            runner, tile = BBoxMethod(dict(runner.models)), None
    from smt.infer.paths import describe_paths

    own = isinstance(runner, (up.SingleModel, BBoxMethod))
    print(f"upscale: {describe_paths(runner.nets(), runner.precision if own else runner.cfg.precision)}",
          file=sys.stderr)
    summary = up.upscale_files(scan.files, args.out, runner, tile=tile, suffix=args.suffix, overwrite=args.overwrite)
    for _, why in summary.skipped:
        print(f"failed: {why}", file=sys.stderr)
    print(f"wrote {len(summary.written)} image(s) to {args.out}"
          + (f"; {len(summary.skipped)} failed" if summary.skipped else "")
          + (f"; {len(scan.skipped)} folder entr{'y' if len(scan.skipped) == 1 else 'ies'} skipped (not images "
             "Pillow reads)" if scan.skipped else ""))
    return 1 if summary.skipped else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from smt.config import load_section
    from smt.export import export_bundle, export_checkpoint, export_model

    if args.name == "bundle":
        if args.checkpoint or args.layout != "official":
            raise ValueError("export bundle: --checkpoint and --layout apply to one model (hat, mambairv2), "
                             "not to the bundle")
        out = export_bundle(load_section("train", args.params), load_section("infer", args.params),
                            load_section("data", args.params).scale, Path(args.results) / "fusion.json", args.output)
    elif args.checkpoint:
        out = export_checkpoint(args.checkpoint, args.output, args.layout, args.model, expect_arch=args.name)
    else:
        out = export_model(load_section("train", args.params), args.name, args.output, args.layout)
    print(f"wrote {out}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from smt.benchmark import (benchmark_sets, bicubic_upscaler, format_table, parse_protocols, results_json,
                               run_cli_methods)

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    _check_names("--sets", "set", sets, _benchmark_sets())
    if args.model is not None:
        _check_names("--model", "preset", [args.model], _presets())
    _keep_freed_memory_on_cpu(args.device)
    seconds: dict[str, list[float]] = {}
    methods, published, label = run_cli_methods(args.checkpoint, args.model, args.bundle, args.device,
                                                 args.self_ensemble, args.tile, args.tile_overlap,
                                                 parse_protocols(args.protocol), seconds)
    scale = methods[label].scale
    run = benchmark_sets({"bicubic": bicubic_upscaler(scale), **methods}, scale, sets, args.root,
                         published=published, downloads=args.downloads, lock=args.lock)
    for line in run.notes:
        print(line)
    for s in sets:
        print("\n" + format_table(run, s))
    if len(seconds) > 1:  # protocols side by side on the same weights (same process)
        print("\nseconds per image: " + ", ".join(f"{m} {sum(t) / len(t):.3f}" for m, t in seconds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results_json(run, label), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


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
    from smt.distributed import dist_info
    from smt.smoke import format_rows, launch_smoke, run_smoke

    if args.nproc != 1:  # torchrun runs this command in each of nproc processes, without --nproc
        return 0 if launch_smoke(args.nproc, args.device, args.models, args.patch, args.batch) else 1
    rows = run_smoke(args.device, args.models, args.patch, args.batch)
    if dist_info()[0] == 0:
        print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


def _cmd_rehearse(args: argparse.Namespace) -> int:
    from smt.rehearse import DEFAULT, SMALLEST, format_rehearsal, rehearse

    red = SMALLEST if args.smallest else DEFAULT
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps: must be >= 1, got {args.steps}")
        from dataclasses import replace

        red = replace(red, steps=args.steps)
    result = rehearse(args.profile, workdir=args.workdir, red=red, allow_download=args.allow_download,
                      keep=True if args.keep else None)
    print(format_rehearsal(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


_DEVICE_HELP = "auto (default): cuda when a CUDA device is available, else cpu"


def _resolve_device(args: argparse.Namespace) -> argparse.Namespace:
    """``--device auto`` -> ``cuda`` or ``cpu``, after parsing: building the parser imports no torch, so
    ``--help`` and the commands that need no torch (``pipeline``) start fast."""
    if getattr(args, "device", None) == "auto":
        args.device = "cuda" if _cuda() else "cpu"
    return args


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (imports nothing heavy)."""
    # `smt` (the console script pyproject.toml installs) or `python -m smt` (argv[0] is then this file's path)
    prog = "smt" if Path(sys.argv[0]).name == "smt" else "python -m smt"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
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
    p = sub.add_parser("upscale", help="super-resolve your images: the pipeline's method (default), an exported "
                                       "bundle (--bundle) or one checkpoint (--checkpoint)")
    p.add_argument("inputs", nargs="*", help="image files or folders (or -i)")
    p.add_argument("-i", "--input", nargs="+", action="extend", help="image files or folders")
    p.add_argument("-o", "--output", "--out", dest="out", required=True,
                   help="output folder (<name><suffix>.png; its parent must exist)")
    p.add_argument("--checkpoint", action="append",
                   help="one model: official .pth or .safetensors (architecture from --model, the file's metadata "
                        "or its weights); with --protocol bbox, twice for the authors' two models, fused")
    p.add_argument("--bundle", help="a method exported by `python -m smt export bundle`")
    p.add_argument("--params", default="params.yaml", help="the run whose method to use (no checkpoint/bundle)")
    p.add_argument("--results", default="results", help="the run's results folder (its fusion.json)")
    p.add_argument("--model", help="preset (hat_l, mambairv2_l, mambairv2_light, ...) for --checkpoint; "
                                   "optional: detected from the file")
    p.add_argument("--tile", type=_tile_arg, default=None,
                   help="LR tile size for bounded memory: 0 = whole image, 'auto' = from free memory "
                        "(default: 0, or the method's infer.tile)")
    p.add_argument("--tile-overlap", type=int, default=8, help="LR pixels (--checkpoint; the method uses its own)")
    p.add_argument("--suffix", help="appended to the output name (default x<scale>; a trailing scale tag of the "
                                    "input name is not repeated)")
    p.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble (--checkpoint)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=_DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--protocol", help="smt (ours) or bbox (the authors' inference protocol, "
                   "docs/bbox_protocol.md); default: smt, or the run's infer.protocol")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (--checkpoint; fast on GPUs and CPUs "
                                                       "with native bf16)")
    p.set_defaults(func=_cmd_upscale)
    p = sub.add_parser("export", help="export a trained model (.pth / .safetensors) or the whole method (bundle)")
    p.add_argument("name", help="a model of the pipeline (train.models: hat, mambairv2) or 'bundle'; with "
                                "--checkpoint, the family the file must be (hat, mambairv2)")
    p.add_argument("-o", "--output", required=True, help=".pth ({'params_ema': ...}) or .safetensors")
    p.add_argument("--checkpoint", help="convert this file (official, ours or the authors') instead of the "
                                        "pipeline's trained weights")
    p.add_argument("--model", help="preset of --checkpoint (default: from its metadata or its weights)")
    p.add_argument("--layout", default="official",
                   help="official (default: {'params_ema': ...}, official keys, no extra upsamplers) or bbox "
                        "(the authors' released layout: {'params': ...}, .pth only)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--results", default="results", help="the run's results folder (bundle: its fusion.json)")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("benchmark", help="a checkpoint on Set5, Set14, B100, Urban100, Manga109, DIV2K_valid "
                                         "(PSNR-Y/SSIM-Y, literature and challenge protocols)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="official .pth or our model.safetensors")
    src.add_argument("--bundle", help="an exported method (issue 19's bundle file)")
    p.add_argument("--model", help="preset (hat_l, mambairv2_l, ...); optional for our own checkpoints")
    p.add_argument("--sets", default="Set5,Set14,B100,Urban100",
                   help="comma-separated: Set5, Set14, B100, Urban100, Manga109 (placed by hand), DIV2K_valid")
    p.add_argument("--root", required=True, help="holds <Set>/HR/; missing sets are downloaded here")
    p.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble (8x slower)")
    p.add_argument("--tile", type=int, default=0, help="LR tile size for bounded memory (0 = whole image)")
    p.add_argument("--tile-overlap", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=_DEVICE_HELP)
    p.add_argument("--protocol", default="smt", help="smt (ours), bbox (the authors' inference protocol), "
                   "a comma list or both: side by side on the same weights, with seconds per image")
    p.add_argument("--json", help="write {set: {psnr_y, ssim_y, n}} here (literature convention)")
    p.add_argument("--downloads", default="~/.cache/smt/downloads", help="where downloaded archives are kept")
    p.add_argument("--lock", default="data/sources.lock.json", help="size/SHA-256 pins of downloaded archives")
    p.set_defaults(func=_cmd_benchmark)
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
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=_DEVICE_HELP)
    p.add_argument("--models", default="large", choices=["large", "tiny"])
    p.add_argument("--patch", type=int, help="training patch (default: stage 1's in profiles/ntire2025.yaml)")
    p.add_argument("--batch", type=int, help="per-GPU batch (default: stage 1's global batch / its GPUs)")
    p.add_argument("--nproc", type=int, default=1, help="processes (one GPU each) under torchrun: DDP and "
                                                        "per-rank device checks")
    p.set_defaults(func=_cmd_smoke)
    p = sub.add_parser("rehearse", help="dress rehearsal of a profile: every stage of one round with its real "
                                        "models, reduced counts, in a scratch folder; timings and extrapolation")
    p.add_argument("profile", nargs="?", default="ntire2025", help="profiles/PROFILE.yaml (default ntire2025)")
    p.add_argument("--workdir", help="scratch folder (new, empty or an earlier rehearsal's; kept); default: a "
                                     "temporary folder, removed afterwards")
    p.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--steps", type=int, help="optimizer steps per training stage (default 2)")
    p.add_argument("--smallest", action="store_true", help="the smallest counts (1 step, 2 training images)")
    p.add_argument("--allow-download", action="store_true", help="let open_clip download the CLIP weights")
    p.add_argument("--json", help="also write the measurements and extrapolations here (JSON)")
    p.set_defaults(func=_cmd_rehearse)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _resolve_device(build_parser().parse_args(argv))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, TypeError) as exc:
        # a KeyError's str() is the repr of its message ("'nope'" or a quoted sentence): print the message itself
        message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
