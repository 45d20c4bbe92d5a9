"""Offline by construction: while compress builds a model, nothing a builder does can fetch weights.

The spec rules (compress.models.spec_schema) already keep loading arguments from builders; this is
the second wall, for a library default or an argument no rule foresaw: the Hugging Face hub is put
in offline mode, and torch.hub (which torchvision and timm download through) sees an empty cache
and refuses to download.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from compress.errors import InputError

# Modules that hold their own reference to torch.hub's download functions (`from torch.hub import
# ...`): patched too when imported.
_HOLDERS = (
    "torch.hub",
    "timm.models._hub",
    "timm.models._builder",
    "torchvision.models._api",
    "torchvision._internally_replaced_utils",
)
_DOWNLOADERS = ("load_state_dict_from_url", "download_url_to_file")


def _refuse(name: str):
    def refused(url: Any = None, *args: Any, **kwargs: Any) -> Any:
        raise InputError(
            f"compress never downloads, and building this model asked for {url} "
            f"(torch.hub.{name}): name a local checkpoint in the model's `weights:` field instead"
        )

    return refused


def _true(value: str | None) -> bool:
    return (value or "").upper() in {"1", "ON", "YES", "TRUE"}


@contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 (and the hub's own flag, if imported), and torch.hub downloads refused
    with an InputError, its cache an empty temporary folder; all restored on exit."""
    with ExitStack() as stack:
        saved_env = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub_constants = sys.modules.get("huggingface_hub.constants")
        saved_flag = getattr(hub_constants, "HF_HUB_OFFLINE", None)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True

        def restore_hub() -> None:
            if saved_env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = saved_env
            constants = sys.modules.get("huggingface_hub.constants")
            if constants is not None:  # imported before, or during (then it read our "1")
                constants.HF_HUB_OFFLINE = (
                    saved_flag if hub_constants is not None else _true(saved_env)
                )

        stack.callback(restore_hub)
        empty_cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="compress-hub-"))
        patches: list[tuple[Any, str, Any]] = []
        torch_hub = sys.modules.get("torch.hub")
        if torch_hub is not None:
            patches.append((torch_hub, "get_dir", lambda: empty_cache))
        for module_name in _HOLDERS:
            module = sys.modules.get(module_name)
            for name in _DOWNLOADERS:
                if module is not None and hasattr(module, name):
                    patches.append((module, name, _refuse(name)))
        for module, name, replacement in patches:
            stack.callback(setattr, module, name, getattr(module, name))
            setattr(module, name, replacement)
        yield
