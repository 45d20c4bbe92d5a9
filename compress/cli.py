"""Command line: thin commands that parse, call one function and print; exit codes live here.

Exit codes: 0 success, 2 invalid input (recipe, path, model spec) or a folder that cannot be
written, 1 a failed check or anything else, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
from pathlib import Path

from compress import __version__
from compress.errors import InputError, StageFailed, Terminated


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with one line, as for any invalid input
        self.print_usage(sys.stderr)
        raise InputError(f"{self.prog}: {message}")


def _input_size(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if not (0 < c <= 64 and 0 < h <= 4096 and 0 < w <= 4096):
        raise argparse.ArgumentTypeError(
            f"expected 1..64 channels and sides of 1..4096 pixels, got {text!r}"
        )
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
    from compress.deploy.backends import add_bench_arguments, backend_names

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
    b.add_argument("--backend", default="onnxruntime", choices=backend_names())
    b.add_argument(
        "--batch-size", type=_batch_sizes, default=[1], metavar="B[,B...]", help="e.g. 1,8,32"
    )
    b.add_argument(
        "--single-stream",
        action="store_true",
        help="MLPerf-SingleStream-like: batch 1, back-to-back queries, report p90",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object")
    add_bench_arguments(b)  # one flag per field of the backends' options models

    se = sub.add_parser(
        "sensitivity",
        help="per-layer INT8 sensitivity of a model, and the float layers a budget needs",
    )
    se.add_argument("model", help="model spec, or a model.safetensors written by a run (INT8 too)")
    se.add_argument("--weights", type=Path)
    se.add_argument(
        "--data", type=Path, required=True, help="ImageFolder root; measured on its val split"
    )
    se.add_argument(
        "--max-drop", type=float, help="validation top-1 points the INT8 model may lose"
    )
    se.add_argument(
        "--margin-se",
        type=float,
        default=0.0,
        help="hold --max-drop with this many standard errors to spare (budget_margin_se)",
    )
    se.add_argument("--out", type=Path, default=Path("sensitivity"), help="output folder")
    se.add_argument("--images", type=int, default=1000, help="validation images used")
    se.add_argument("--calibration-batches", type=int, default=16)
    se.add_argument("--batch-size", type=int, help="calibration and evaluation batch size")
    se.add_argument("--image-size", type=int, help="model input side (default: the images' own)")
    se.add_argument("--val-fraction", type=float, help="share of train/ carved as val")
    se.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    se.add_argument("--ranking", choices=["speed", "accuracy"])
    se.add_argument("--json", action="store_true", help="print sensitivity.json's content")

    rp = sub.add_parser("report", help="render report.md and pareto.png of a run folder")
    rp.add_argument("run_dir", type=Path)
    return p


def cmd_run(args) -> int:
    from compress.api import run

    run(args.recipe, out=args.out, overrides=args.set, fresh=args.fresh)
    return 0


def cmd_validate(args) -> int:
    import yaml

    from compress.api import as_recipe, preflight_warnings

    recipe = as_recipe(args.recipe, args.set)
    for warning in preflight_warnings(recipe):
        print(f"warning: {warning}", file=sys.stderr)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.recipe}: valid ({len(recipe.stages)} stages)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from compress.api import evaluate_model

    data = {
        "root": args.data,
        "image_size": args.image_size,
        "eval_batch_size": args.batch_size,
        "limit_per_class": args.limit_per_class,
        "test_limit_per_class": args.limit_per_class,
    }
    result = evaluate_model(args.model, data, args.split, args.weights, args.device)
    result = {"model": args.model, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.model} on {args.split} ({result['n']} images): "
            f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
        )
    return 0


def cmd_export(args) -> int:
    from compress.api import export
    from compress.models import create_model

    model = create_model(args.model, weights=args.weights, num_classes=args.num_classes)[0]
    result = export(model, args.out, args.input_size, dynamo=not args.no_dynamo)
    print(
        f"wrote {args.out} ({result['size_bytes']:,} bytes); "
        f"max |onnxruntime - torch| = {result['max_abs_diff']:.3g} on random inputs"
    )
    return 0


def cmd_bench(args) -> int:
    import contextlib

    from compress.deploy.backends import bench, options_from_args

    # with --json, stdout carries the JSON alone: log lines go to stderr meanwhile
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        options = options_from_args(args)
        results = bench(args.onnx, args.backend, options, args.batch_size, args.single_stream)
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


def cmd_sensitivity(args) -> int:
    from compress.api import sensitivity
    from compress.quant.sensitivity import report_lines

    data = {"root": args.data, "image_size": args.image_size}
    if args.batch_size:
        data |= {"batch_size": args.batch_size, "eval_batch_size": args.batch_size}
    if args.val_fraction is not None:
        data["val_fraction"] = args.val_fraction
    doc = sensitivity(
        args.model,
        data,
        args.out,
        args.weights,
        args.max_drop,
        args.images,
        args.calibration_batches,
        args.target,
        args.ranking,
        args.margin_se,
    )
    if args.json:
        print(json.dumps(doc))
        return 0
    print("\n".join(report_lines(doc, others=len(doc["layers"]))))
    written = "sensitivity.json, sensitivity.png" + (
        ", model.int8.onnx" if args.max_drop is not None else ""
    )
    print(f"wrote {written} in {args.out}")
    return 0


def cmd_report(args) -> int:
    from compress.api import render_report

    md, png = render_report(args.run_dir)
    print(f"wrote {md} and {png}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "eval": cmd_eval,
    "export": cmd_export,
    "bench": cmd_bench,
    "sensitivity": cmd_sensitivity,
    "report": cmd_report,
}


FILE_SYSTEM_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from compress.log import setup_logging

    setup_logging()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in FILE_SYSTEM_ERRORS:
            raise
        print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(
            f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}: finished stages "
            "and the last epoch checkpoint are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
