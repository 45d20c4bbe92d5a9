"""The bench backends by name, `bench` (the one function that runs any of them), and the
`compress bench` flags, generated from the backends' options models.

Each backend module describes itself with a `compress.deploy.timing.Backend` (name, options
model, run function) and never imports this module; the built-in ones are collected here on
first use, and `register_backend` adds others.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from compress.deploy.timing import (
    TIMING_FIELDS,
    Backend,
    BenchSettings,
    check_model_file,
    describe_errors,
)
from compress.errors import InputError
from compress.log import logger

_BACKENDS: dict[str, Backend] = {}
_BUILTINS_LOADED = False

# Flag names kept from earlier releases, beside the generated `--field-name`.
CLI_ALIASES = {"min_duration_s": ("--min-duration",)}


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    from compress.deploy.onnxruntime_backend import BACKEND as ONNXRUNTIME
    from compress.deploy.remote import BACKEND as SSH
    from compress.deploy.tensorrt import BACKEND as TENSORRT
    from compress.deploy.trtexec import BACKEND as TRTEXEC

    for backend in (ONNXRUNTIME, TENSORRT, TRTEXEC, SSH):
        _BACKENDS.setdefault(backend.name, backend)
    _BUILTINS_LOADED = True


def register_backend(backend: Backend) -> Backend:
    """Add a backend (its options model must extend BenchSettings); returns it."""
    _load_builtins()
    if not issubclass(backend.options, BenchSettings):
        raise TypeError(f"backend {backend.name}: options must extend BenchSettings")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    _load_builtins()
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    _load_builtins()
    if name not in _BACKENDS:
        raise InputError(f"backend {name!r}: expected one of {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def backend_options(backend: str, options: BaseModel | Mapping[str, Any] | None = None) -> Any:
    """`options` as `backend`'s options model: an instance of it as is; another model (e.g. plain
    BenchSettings) or a mapping by its fields (only those set count as given)."""
    model = get_backend(backend).options
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump(exclude_unset=True)
    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as e:
        raise InputError(f"backend {backend}: {describe_errors(e)}") from None


def bench(
    model_path: Path | str,
    backend: str = "onnxruntime",
    options: BaseModel | Mapping[str, Any] | None = None,
    batch_sizes: Iterable[int] = (1,),
    single_stream: bool = False,
) -> list[dict[str, Any]]:
    """Time `model_path` on `backend`: one result per batch size.

    `options`: the backend's options model (OnnxRuntimeOptions, TensorRTOptions, TrtexecOptions,
    SSHOptions), or a mapping of its fields. `single_stream`: an MLPerf-SingleStream-like run,
    i.e. batch 1, each query issued when the previous one returns, reporting the 90th percentile.
    """
    spec = get_backend(backend)
    opts = backend_options(backend, options)
    sizes = [1] if single_stream else list(batch_sizes)
    if not sizes or any(b <= 0 for b in sizes):
        raise InputError(f"batch sizes must be > 0 (got {sizes})")
    results = spec.run(check_model_file(model_path), sizes, opts)
    if single_stream:
        for r in results:
            r["mode"] = "single_stream"
            r["single_stream_p90_ms"] = r["p90_ms"]
    return results


# ---- the command line: one flag per options field -------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def plain_annotation(annotation: Any) -> Any:
    """The type of a field's annotation, without `| None` and Annotated."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return plain_annotation(args[0])
    return annotation


def cli_fields() -> dict[str, tuple[Any, list[str]]]:
    """Each options field of every backend: (its pydantic field, the backends that take it);
    timing fields first."""
    fields: dict[str, tuple[Any, list[str]]] = {
        n: (BenchSettings.model_fields[n], []) for n in TIMING_FIELDS
    }
    for name in backend_names():
        for field_name, info in get_backend(name).options.model_fields.items():
            fields.setdefault(field_name, (info, []))[1].append(name)
    return fields


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """A `--field-name` flag for each options field (help from its description); unset flags
    are None, so that only what the command line gives counts as given."""
    groups: dict[str, Any] = {}
    everyone = set(backend_names())
    for name, (info, users) in cli_fields().items():
        annotation = plain_annotation(info.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": info.description or ""}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            choices = list(typing.get_args(annotation))
            kwargs.update(choices=choices, type=type(choices[0]))
        elif annotation in (int, float, str, Path):
            kwargs["type"] = annotation
            metavar = {int: "N", float: "S" if name.endswith("_s") else "X"}.get(annotation)
            if metavar:
                kwargs["metavar"] = metavar
        else:
            raise TypeError(f"option {name}: no command-line form for {info.annotation}")
        title = "timing" if set(users) == everyone else f"{', '.join(users)} backend"
        title += "s" if 1 < len(users) < len(everyone) else ""
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        groups[title].add_argument(_flag(name), *CLI_ALIASES.get(name, ()), **kwargs)


def options_from_args(args: argparse.Namespace) -> Any:
    """The chosen backend's options model from the flags given (`args.backend`)."""
    model = get_backend(args.backend).options
    given = {n: v for n in cli_fields() if (v := getattr(args, n, None)) is not None}
    unused = sorted(_flag(n) for n in given if n not in model.model_fields)
    if unused:
        logger.warning(f"backend {args.backend} does not use {', '.join(unused)}")
    try:
        return model.model_validate({k: v for k, v in given.items() if k in model.model_fields})
    except ValidationError as e:
        raise InputError(f"backend {args.backend}: {describe_errors(e, _flag)}") from None
