"""Command line: thin commands that parse, call one function and print; exit codes live here.

Exit codes: 0 success, 2 invalid input (recipe, path, model spec), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compress import __version__
from compress.errors import InputError, StageFailed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with one line, as for any invalid input
        self.print_usage(sys.stderr)
        raise InputError(f"{self.prog}: {message}")


def _input_size(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    return c, h, w


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected B or B,B,... such as 1,32, got {text!r}"
        ) from None
    if any(b <= 0 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be > 0, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from compress.deploy.bench import BACKENDS
    from compress.deploy.devices import profile_names

    p = _Parser(prog="compress", description="Edge model compression toolchain.")
    p.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a recipe (resumes a previous run in the same folder)")
    r.add_argument("recipe", type=Path)
    r.add_argument("--out", type=Path, help="run folder (default: runs/<name>)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. stages.1.epochs=3",
    )
    r.add_argument("--fresh", action="store_true", help="discard earlier results and start over")

    v = sub.add_parser("validate", help="check a recipe and print it resolved")
    v.add_argument("recipe", type=Path)
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    e = sub.add_parser("eval", help="accuracy of a model on an ImageFolder split")
    e.add_argument(
        "model", help="model spec: cifar_resnet56, timm:NAME, torchvision:NAME or a path"
    )
    e.add_argument("--weights", type=Path)
    e.add_argument(
        "--data", type=Path, required=True, help="ImageFolder root with train/ and test/"
    )
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--image-size", type=int, help="model input side (default: the images' own)")
    e.add_argument("--limit-per-class", type=int)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--json", action="store_true", help="print one JSON object")

    x = sub.add_parser("export", help="export a model to ONNX and check parity")
    x.add_argument("model")
    x.add_argument("--format", default="onnx", choices=["onnx"])
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--weights", type=Path)
    x.add_argument("--input-size", type=_input_size, default=(3, 32, 32), metavar="C,H,W")
    x.add_argument("--num-classes", type=int, help="classifier width (default: the model's)")
    x.add_argument("--no-dynamo", action="store_true", help="legacy TorchScript exporter")

    b = sub.add_parser("bench", help="latency and throughput of an ONNX model (or engine)")
    b.add_argument("onnx", type=Path)
    b.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    b.add_argument(
        "--batch-size", type=_batch_sizes, default=[1], metavar="B[,B...]", help="e.g. 1,8,32"
    )
    b.add_argument(
        "--single-stream",
        action="store_true",
        help="MLPerf-SingleStream-like: batch 1, back-to-back queries, report p90",
    )
    b.add_argument("--threads", type=int)
    b.add_argument("--warmup", type=int)
    b.add_argument("--min-iters", type=int)
    b.add_argument("--min-duration", type=float, help="seconds per run")
    b.add_argument("--repeats", type=int, help="timed runs; statistics are medians")
    b.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime")
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    g = b.add_argument_group("ssh backend (unset values come from ~/.ssh/config)")
    g.add_argument("--host", help="host name or ~/.ssh/config alias")
    g.add_argument("--user")
    g.add_argument("--port", type=int)
    g.add_argument("--identity-file", help="private key file")
    g.add_argument("--known-hosts", help="known_hosts file (host keys are always checked)")
    g.add_argument("--ssh-config", help="ssh config file instead of ~/.ssh/config")
    g.add_argument("--remote-python", default="python3", help="remote interpreter with compress")
    g.add_argument("--remote-backend", default="auto", choices=["auto", "compress", "trtexec"])
    g.add_argument("--device-profile", help="Jetson profile: " + ", ".join(profile_names()))
    b.add_argument("--json", action="store_true", help="print one JSON object")

    rp = sub.add_parser("report", help="render report.md and pareto.png of a run folder")
    rp.add_argument("run_dir", type=Path)
    return p


def cmd_run(args) -> int:
    from compress.log import logger
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    for warning in preflight_warnings(recipe):
        logger.warning(warning)
    out = args.out or Path("runs") / recipe.name
    pipeline = Pipeline(recipe, out, fresh=args.fresh)
    report = pipeline.run()
    if pipeline.dist.is_main:
        logger.info(f"run complete: {out}/report.json, {out}/report.md, {out}/pareto.png")
        for m in report["models"]:
            top1 = m.get("top1")
            logger.info(
                f"  {m['name']:<16} top1 {'-' if top1 is None else f'{top1:.2f}%'}"
                f"  params {m.get('params', 0):,}"
            )
    return 0


def preflight_warnings(recipe) -> list[str]:
    """Problems a stage will hit when it runs (e.g. TensorRT asked for but missing), by stage."""
    return [
        f"stages[{i}] ({stage.type}): {w}"
        for i, stage in enumerate(recipe.stages)
        for w in getattr(stage, "preflight_warnings", list)()
    ]


def cmd_validate(args) -> int:
    import yaml

    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    for warning in preflight_warnings(recipe):
        print(f"warning: {warning}", file=sys.stderr)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.recipe}: valid ({len(recipe.stages)} stages)", file=sys.stderr)
    return 0


def _cli_model(spec_text: str, weights: Path | None, num_classes: int | None):
    from compress.models import create_model

    return create_model(spec_text, weights=weights, num_classes=num_classes)[0].eval()


def cmd_eval(args) -> int:
    from compress.config import DataConfig
    from compress.data import ImageFolderData
    from compress.evaluation import evaluate
    from compress.pipeline import resolve_device

    try:
        cfg = DataConfig.model_validate(
            {
                "root": args.data,
                "image_size": args.image_size,
                "eval_batch_size": args.batch_size,
                "limit_per_class": args.limit_per_class,
                "test_limit_per_class": args.limit_per_class,
            }
        )
    except Exception as e:  # noqa: BLE001 - pydantic error: report as bad input
        raise InputError(f"--data/--image-size/--batch-size: {e}") from None
    data = ImageFolderData(cfg)
    model = _cli_model(args.model, args.weights, data.num_classes)
    result = evaluate(model, data.loader(args.split), resolve_device(args.device), desc="eval")
    result = {"model": args.model, "split": args.split, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.model} on {args.split} ({result['n']} images): "
            f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
        )
    return 0


def cmd_export(args) -> int:
    import torch

    from compress.deploy.onnx_export import check_parity, export_onnx

    model = _cli_model(args.model, args.weights, args.num_classes)
    export_onnx(model, args.out, args.input_size, dynamo=not args.no_dynamo)
    parity = check_parity(model, args.out, torch.randn(8, *args.input_size))
    print(
        f"wrote {args.out} ({args.out.stat().st_size:,} bytes); "
        f"max |onnxruntime - torch| = {parity['max_abs_diff']:.3g} on random inputs"
    )
    return 0


def bench_options(args) -> dict:
    """Backend-specific options from the command line."""
    if args.backend == "onnxruntime":
        return {"provider": args.provider}
    if args.backend in ("tensorrt", "trtexec"):
        return {"precision": args.precision}
    keys = ("host", "user", "port", "identity_file", "known_hosts", "ssh_config")
    keys += ("remote_python", "remote_backend", "device_profile", "precision")
    return {k: getattr(args, k) for k in keys}


def cmd_bench(args) -> int:
    from compress.deploy.bench import BenchSettings, bench_sweep
    from compress.deploy.devices import load_profile

    defaults = dict(BenchSettings().__dict__)
    if args.device_profile:
        defaults.update(load_profile(args.device_profile)["bench"])
    given = {
        "warmup": args.warmup,
        "min_iters": args.min_iters,
        "min_duration_s": args.min_duration,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    settings = BenchSettings(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
    results = bench_sweep(
        args.backend,
        args.onnx,
        args.batch_size,
        settings,
        bench_options(args),
        single_stream=args.single_stream,
    )
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}))
        return 0
    for r in results:
        energy = r.get("energy_per_inference_mj")
        print(
            f"{args.onnx} on {r['backend']} ({r.get('device')}), batch {r['batch_size']}, "
            f"{r['iterations']} calls in {r['repeats']} runs (medians): p50 {r['p50_ms']:.3f} ms, "
            f"p90 {r['p90_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
            f"{r['throughput_ips']:.1f} images/s"
            + (f", {energy:.2f} mJ/inference" if energy else "")
        )
    return 0


def cmd_report(args) -> int:
    from compress.report import render

    md, png = render(args.run_dir)
    print(f"wrote {md} and {png}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "eval": cmd_eval,
    "export": cmd_export,
    "bench": cmd_bench,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    from compress.log import setup_logging

    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: finished stages and the last epoch checkpoint are kept; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
