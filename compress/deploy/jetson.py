"""What a remote device is (probe), whether it matches its profile, its clocks, and its power.

The probe reads JetPack/L4T, TensorRT, GPU, power mode and which tools are there; tegrastats, where
present, samples the board input rail during a timed run, which gives energy per inference.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from compress.deploy.devices import DeviceProfile
from compress.deploy.ssh import RemoteError, SSHTarget
from compress.deploy.trtexec import parse_version

PROBE = r"""
echo "arch=$(uname -m)"
[ -r /etc/nv_tegra_release ] && echo "l4t=$(head -n1 /etc/nv_tegra_release)"
v=$(dpkg-query -W -f='${Version}' nvidia-jetpack 2>/dev/null) && echo "jetpack=$v"
[ -r /proc/device-tree/model ] && echo "model=$(tr -d '\0' < /proc/device-tree/model)"
g=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1) && [ -n "$g" ] && echo "gpu=$g"
t=$(command -v trtexec || ls /usr/src/tensorrt/bin/trtexec 2>/dev/null) && echo "trtexec=$t"
command -v tegrastats >/dev/null 2>&1 && echo "tegrastats=$(command -v tegrastats)"
m=$(nvpmodel -q 2>/dev/null | grep -i 'power mode' | head -n1) && [ -n "$m" ] && echo "power_mode=$m"
c=$(__PY__ -c 'import compress; print(compress.__version__)' 2>/dev/null) && echo "compress=$c"
r=$(__PY__ -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null) && echo "tensorrt_python=$r"
echo "probe=ok"
"""

# `sudo -n` never prompts: without a passwordless rule for jetson_clocks it fails at once.
LOCK_CLOCKS = (
    "out=$(sudo -n jetson_clocks 2>&1) && echo clocks=locked || "
    '{ echo clocks=failed; printf "%s\\n" "$out" | tail -n 3; }'
)


def probe(target: SSHTarget) -> dict[str, str]:
    """What the device is and which tools it has (missing ones are simply absent)."""
    out = target.ssh(PROBE.replace("__PY__", target.python()), timeout=120)
    info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if info.pop("probe", None) != "ok":
        raise RemoteError(f"ssh {target.host}: probe gave no answer (output: {out[:200]!r})")
    if "power_mode" in info:
        info["power_mode"] = info["power_mode"].split(":", 1)[-1].strip()
    if "trtexec" in info:
        banner = target.ssh(f"{shlex.quote(info['trtexec'])} --help 2>&1 | head -n 3", check=False)
        version = parse_version(banner)
        if version:
            info["tensorrt"] = version
    return info


def check_profile(info: dict[str, str], profile: DeviceProfile | None) -> None:
    """Refuse a device that does not match its profile (TensorRT major, power mode)."""
    if profile is None:
        return
    want = profile.tensorrt_major
    have = info.get("tensorrt") or info.get("tensorrt_python")
    if want and have and int(have.split(".")[0]) != want:
        raise RemoteError(
            f"device profile {profile.name} expects TensorRT {want}.x; the device has {have}"
        )
    mode = profile.power_mode
    if mode and info.get("power_mode") and info["power_mode"] != mode:
        raise RemoteError(
            f"device profile {profile.name} requires power mode {mode}; the device is in "
            f"{info['power_mode']} (set it with `sudo nvpmodel -m <id>`, see `nvpmodel -p --verbose`)"
        )


def jetson_clocks(target: SSHTarget) -> tuple[bool, str]:
    """Lock the clocks at the power mode's maximum with `sudo -n jetson_clocks`: (locked, why not)."""
    lines = target.ssh(LOCK_CLOCKS, timeout=60, check=False).strip().splitlines()
    if lines and lines[0] == "clocks=locked":
        return True, ""
    return False, " | ".join(line for line in lines[1:] if line.strip()) or "no output"


# Board input rail: `VDD_IN 4821mW/4821mW` (Orin), `VDD_IN 3140/3208` (Xavier), `POM_5V_IN` (Nano).
_RAIL = re.compile(r"\b(VDD_IN|POM_5V_IN|VIN_SYS_5V0)\s+(\d+)(?:mW)?/")


def parse_tegrastats(text: str) -> dict[str, Any] | None:
    """Mean board input power over tegrastats lines (instantaneous values, not its averages)."""
    samples: list[float] = []
    rail = None
    for line in text.splitlines():
        m = _RAIL.search(line)
        if m:
            rail = m.group(1)
            samples.append(float(m.group(2)))
    if not samples:
        return None
    return {
        "power_rail": rail,
        "power_samples": len(samples),
        "power_mean_w": sum(samples) / len(samples) / 1e3,
    }


def add_energy(result: dict[str, Any], power: dict[str, Any] | None) -> dict[str, Any]:
    """Energy per inference = mean board power / throughput (board total, idle draw included)."""
    if power:
        result.update(power)
        if result.get("throughput_ips"):
            result["energy_per_inference_mj"] = (
                power["power_mean_w"] / result["throughput_ips"] * 1e3
            )
    return result


def with_power(script: str, info: dict[str, str], workdir: str) -> str:
    """`script` with tegrastats sampling into `workdir/power.log` while it runs (if present)."""
    if "tegrastats" not in info:
        return script
    log = shlex.quote(f"{workdir}/power.log")
    return (
        f"{shlex.quote(info['tegrastats'])} --interval 100 > {log} 2>/dev/null & TS=$!; "
        f"{script}; rc=$?; kill $TS 2>/dev/null; exit $rc"
    )


def fetch_power(
    target: SSHTarget, info: dict[str, str], workdir: str, local: Path
) -> dict[str, Any] | None:
    """The mean power of the last run sampled by `with_power`, or None without tegrastats."""
    if "tegrastats" not in info:
        return None
    target.scp([target.remote(f"{workdir}/power.log")], str(local / "power.log"))
    return parse_tegrastats((local / "power.log").read_text())
