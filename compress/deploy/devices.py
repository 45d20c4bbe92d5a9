"""Jetson device profiles: data files (`devices/*.yaml`) that set benchmark defaults for a board.

A profile names the TensorRT major version and power mode (nvpmodel name) the device must have;
the ssh backend refuses a device that does not match, and uses the profile's timing settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.errors import InputError

PROFILES = Path(__file__).with_name("devices")


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    """The profile `name` (a file stem in compress/deploy/devices, or a path to a YAML file)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"device profile {name!r} not found (one of {', '.join(profile_names())})")
    profile = yaml.safe_load(path.read_text())
    missing = {"name", "tensorrt_major", "power_mode", "bench"} - set(profile or {})
    if missing:
        raise InputError(f"{path}: device profile lacks {', '.join(sorted(missing))}")
    return profile
