"""File reading and atomic writes: a written file is either absent, the old version, or the complete
new version."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.errors import InputError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as any other new file, not mkstemp's 0600
        with open(tmp, "rb+") as f:  # on disk before the rename makes it the file
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def without_non_finite(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """`obj` with every NaN or infinite float replaced by None, and where each one was."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{where or '.'}: {obj}"]
    found: list[str] = []
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], bad = without_non_finite(v, f"{where}.{k}" if where else str(k))
            found += bad
        return out, found
    if isinstance(obj, (list, tuple)):
        items = []
        for i, v in enumerate(obj):
            item, bad = without_non_finite(v, f"{where}[{i}]")
            items.append(item)
            found += bad
        return items, found
    return obj, found


def write_json(path: Path | str, obj: Any) -> None:
    """Write strict JSON atomically: a NaN or infinity is written as null."""
    clean, _ = without_non_finite(obj)
    text = json.dumps(clean, indent=2, sort_keys=False, default=str, allow_nan=False)
    write_text(path, text + "\n")


def read_json(path: Path | str) -> Any:
    """A JSON file's content; InputError naming the file when it is unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); the file is damaged") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def read_json_if_intact(path: Path | str) -> Any:
    """A JSON file's content, or None when it is missing or damaged (e.g. by a disk that filled
    up): for state that is rebuilt when it cannot be read."""
    if not Path(path).is_file():
        return None
    try:
        return read_json(path)
    except InputError:
        return None


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def content_digest(path: Path | str) -> str:
    """SHA-256 of a file's bytes, read once per process while its size and mtime stay the same."""
    st = Path(path).stat()
    return _cached_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class _DuplicateKey(Exception):
    pass


def _yaml_loader_class() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """The safe loader, refusing duplicate keys (naming both lines)."""

        def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *alias` merges; its keys may be overridden
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if first != line:
                    raise _DuplicateKey(f"duplicate key {key!r} on lines {first} and {line}")
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _expanded_size(node: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (shared nodes counted each
    time they are referenced); ValueError on an alias that refers to itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ValueError("an alias refers to the node that contains it")
    open_.add(key)
    children: list[Any] = []
    if isinstance(node.value, list):
        for item in node.value:
            children.extend(item if isinstance(item, tuple) else (item,))
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_)
        if total > MAX_YAML_NODES:
            break
    open_.discard(key)
    sizes[key] = total
    return total


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text (safe loader, no duplicate keys, bounded alias expansion); InputError
    naming `where` (a file or a flag) when it is not valid or too large."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise InputError(f"{where}: larger than {MAX_YAML_BYTES >> 20} MiB; a recipe is a few KiB")
    loader = _yaml_loader_class()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, set())
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
        if size > MAX_YAML_NODES:
            raise InputError(
                f"{where}: its aliases expand to more than {MAX_YAML_NODES:,} values; "
                "write the values out or use fewer nested aliases"
            )
        return loader.construct_document(node)
    except _DuplicateKey as e:
        raise InputError(f"{where}: {e}; keep one") from None
    except yaml.YAMLError as e:
        detail = str(e).replace('"<unicode string>"', where)
        raise InputError(f"{where}: not valid YAML ({detail})") from None
    finally:
        loader.dispose()


def read_yaml(path: Path | str) -> Any:
    """A YAML file's content (see `parse_yaml`); InputError naming the file when it cannot be read,
    is not UTF-8 or is not valid YAML."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise InputError(
                f"{path}: larger than {MAX_YAML_BYTES >> 20} MiB; a recipe is a few KiB"
            )
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None
    return parse_yaml(text.removeprefix("\ufeff"), str(path))
