"""compress: edge model compression toolchain (search, distill, quantize, export, bench).

The Python API is importable from here (`compress.run`, `compress.load_model`, ...); each name
loads its module on first use, so `import compress` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "compress.api": (
        "as_recipe",
        "evaluate_model",
        "export",
        "preflight_warnings",
        "render_report",
        "run",
        "sensitivity",
    ),
    "compress.recipe": ("Recipe", "load_recipe", "parse_recipe"),
    "compress.models": (
        "ModelSpec",
        "create_model",
        "load_model",
        "load_weights",
        "register_spec_kind",
        "save_model",
    ),
    "compress.deploy.backends": ("backend_names", "bench", "register_backend"),
    "compress.stages": ("STAGES", "StageConfig", "StageContext", "StageResult", "register_stage"),
    "compress.runs": ("RunFolder", "StageOutput"),
    "compress.errors": ("InputError", "StageFailed"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
