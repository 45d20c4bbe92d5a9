"""The external-data files of an ONNX model, checked before anything reads or copies them.

An ONNX tensor may keep its bytes in another file, named by its `location`; onnxruntime, TensorRT,
trtexec and the ssh backend's copy to the device all open that file. A crafted model could name
any file (`/etc/passwd`, `../../.ssh/id_ed25519`, a symlink out of its folder), so
`external_data_files` is the one check every reader goes through: a location must be a relative
path without `..` that names a file inside the model's own folder, symlinks resolved.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from compress.errors import InputError


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: Any) -> Iterator[Any]:
    """Tensors in a node's attributes (Constant values), subgraphs (If, Loop, Scan) included."""
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in (*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []),
                       *attr.sparse_tensors):  # fmt: skip
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def _model_tensors(model: Any) -> Iterator[Any]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _relative_location(location: str) -> PurePosixPath | None:
    """`location` as a plain relative path, or None when it is absolute, climbs with `..`, or
    holds control characters or backslashes (a Windows separator)."""
    if not location or "\\" in location:
        return None
    if any(unicodedata.category(c).startswith("C") for c in location):
        return None
    pure = PurePosixPath(location)
    if pure.is_absolute() or PureWindowsPath(location).drive or ".." in pure.parts:
        return None
    return pure if pure.parts else None


def external_data_files(path: Path | str) -> dict[str, Path]:
    """The files that hold `path`'s external data: {location as written in the model (normalised):
    the file beside the model}. InputError naming the model and the location for one that is
    not a relative path inside the model's folder (symlinks resolved), or that is missing."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise InputError(f"{path}: not a readable ONNX model ({e})") from None
    folder = path.parent.absolute()
    inside = folder.resolve()
    files: dict[str, Path] = {}
    missing: list[str] = []
    for tensor in _model_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        relative = _relative_location(location)
        file = folder / relative if relative is not None else None
        if file is None or not file.resolve().is_relative_to(inside):
            raise InputError(
                f"{path}: external data location {location!r} of tensor {tensor.name!r} is "
                f"outside the model's folder; only files in {folder}, named by a relative path "
                "without '..', are read"
            )
        if not file.is_file():
            missing.append(str(file))
        files[str(relative)] = file
    if missing:
        raise InputError(f"{path}: external data file(s) missing: {', '.join(sorted(missing))}")
    return dict(sorted(files.items()))
