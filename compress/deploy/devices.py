"""Jetson device profiles: data files (`devices/*.yaml`) that set benchmark defaults for a board.

A profile names the TensorRT major version and power mode (nvpmodel name) the device must have
(the ssh backend refuses a device that does not match), and gives defaults for what the user
leaves unset: timing settings, engine precision, and whether to lock the clocks. `apply_profile`
is the one place those defaults are applied (the ssh backend's options model calls it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from compress.config import StrictModel
from compress.deploy.timing import BenchSettings, Precision, describe_errors
from compress.errors import InputError
from compress.io import read_yaml

PROFILES = Path(__file__).with_name("devices")


class DeviceProfile(StrictModel):
    """One board in one configuration."""

    name: str = Field(description="Profile name (the file stem).")
    device: str | None = Field(None, description="The board, e.g. Jetson Orin Nano.")
    jetpack: str | None = Field(None, description="JetPack release the profile is for.")
    tensorrt_major: int = Field(gt=0, description="TensorRT major version the device must have.")
    power_mode: str = Field(description="nvpmodel power mode the device must be in, by name.")
    jetson_clocks: bool = Field(False, description="Lock the clocks before timing.")
    precision: Precision = None
    bench: BenchSettings = Field(description="Timing settings used unless the user sets them.")

    def defaults(self) -> dict[str, Any]:
        """Option values this profile supplies where the user gave none."""
        out: dict[str, Any] = self.bench.model_dump(exclude_unset=True)
        out["jetson_clocks"] = self.jetson_clocks
        if self.precision is not None:
            out["precision"] = self.precision
        return out


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_profile(name: str) -> DeviceProfile:
    """The profile `name` (a file stem in compress/deploy/devices, or a path to a YAML file)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"device profile {name!r} not found (one of {', '.join(profile_names())})")
    raw = read_yaml(path)
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as e:
        raise InputError(f"{path}: invalid device profile: {describe_errors(e)}") from None


def apply_profile(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with its device profile's defaults filled in where a value is unset (absent or
    None): explicit values win."""
    name = options.get("device_profile")
    if not name:
        return options
    defaults = load_profile(str(name)).defaults()
    return {**options, **{k: v for k, v in defaults.items() if options.get(k) is None}}
