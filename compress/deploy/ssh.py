"""Benchmark on a remote device (e.g. a Jetson) over SSH, with the system OpenSSH client.

Host, user, port, key and known-hosts file come from the arguments or from `~/.ssh/config`
(HOST may be an alias there). BatchMode is on (no password prompts; nothing is stored) and host
keys are checked strictly. The flow: probe the device (JetPack/L4T, TensorRT, GPU, power mode,
tools), copy the ONNX model and its external data to a temporary folder, run `compress bench`
there when compress is installed (else build and time with trtexec), sample power with
tegrastats where present, copy the results back, and remove the temporary folder.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.deploy.bench import BenchSettings, check_model_file, input_shape_for
from compress.deploy.trtexec import (
    build_flags,
    onnx_input,
    parse_summary,
    parse_times,
    parse_version,
    result_from_times,
    run_flags,
)
from compress.errors import InputError, StageFailed


class RemoteError(StageFailed):
    """The remote device could not be reached or lacks a tool: exit code 1 with the reason."""


@dataclass
class SSHTarget:
    """Where to connect. Unset values fall back to `~/.ssh/config` (or `ssh_config`)."""

    host: str
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    connect_timeout_s: int = 10
    remote_python: str = "python3"
    timeout_s: float = 1800
    extra: list[str] = field(default_factory=list)

    def options(self) -> list[str]:
        opts = [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={self.connect_timeout_s}",
        ]  # fmt: skip
        if self.ssh_config:
            opts += ["-F", self.ssh_config]
        if self.identity_file:
            opts += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.user:
            opts += ["-o", f"User={self.user}"]
        return opts + list(self.extra)

    def ssh(self, script: str, timeout: float | None = None, check: bool = True) -> str:
        """Run `script` with the remote user's shell; return stdout."""
        port = ["-p", str(self.port)] if self.port else []
        cmd = ["ssh", *self.options(), *port, self.host, script]
        proc = self._run(cmd, timeout)
        if check and proc.returncode != 0:
            raise RemoteError(f"ssh {self.host}: `{script[:80]}` failed: {_tail(proc)}")
        return proc.stdout

    def scp(self, sources: list[str], dest: str, timeout: float | None = None) -> None:
        port = ["-P", str(self.port)] if self.port else []
        proc = self._run(["scp", "-q", "-B", *self.options(), *port, *sources, dest], timeout)
        if proc.returncode != 0:
            raise RemoteError(f"scp to/from {self.host} failed: {_tail(proc)}")

    def remote(self, path: str) -> str:
        return f"{self.host}:{path}"

    def _run(self, cmd: list[str], timeout: float | None) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=timeout or self.timeout_s,
            )
        except FileNotFoundError:
            raise RemoteError(
                f"{cmd[0]} not found: install the OpenSSH client (Debian/Ubuntu: openssh-client)"
            ) from None
        except subprocess.TimeoutExpired:
            raise RemoteError(
                f"{cmd[0]} {self.host}: no answer within {timeout or self.timeout_s:.0f} s"
            ) from None
        if proc.returncode == 255:  # ssh's own failure, not the remote command's
            raise RemoteError(connection_problem(self, proc.stderr))
        return proc


def _tail(proc: subprocess.CompletedProcess, lines: int = 12) -> str:
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return f"exit {proc.returncode}: " + " | ".join(text[-lines:])


def connection_problem(target: SSHTarget, stderr: str) -> str:
    where = f"{target.host}" + (f" port {target.port}" if target.port else "")
    text = stderr.strip()
    if "Connection refused" in text:
        return f"ssh {where}: connection refused (is sshd running there, on that port?)"
    if (
        "Host key verification failed" in text
        or "No ED25519 host key" in text
        or "host key" in text.lower()
    ):
        return (
            f"ssh {where}: host key not known or changed ({text.splitlines()[-1]}); add it to "
            "known_hosts after checking it (e.g. `ssh-keyscan` plus fingerprint comparison)"
        )
    if "Permission denied" in text:
        return (
            f"ssh {where}: authentication failed ({text.splitlines()[-1]}); set up key login "
            "(ssh-copy-id) - passwords are not used"
        )
    if "Could not resolve hostname" in text:
        return f"ssh {where}: unknown host (not in DNS or ~/.ssh/config)"
    return f"ssh {where}: connection failed: {text.splitlines()[-1] if text else 'no message'}"


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


def probe(target: SSHTarget) -> dict[str, str]:
    """What the device is and which tools it has (missing ones are simply absent)."""
    out = target.ssh(PROBE.replace("__PY__", target.remote_python), timeout=120)
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


def external_data_files(path: Path) -> list[Path]:
    """The model's external-data files (e.g. `model.onnx.data`), which must travel with it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    files = [path.parent / f for f in sorted(found)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{path}: external data file(s) missing: {', '.join(missing)}")
    return files


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


def check_profile(info: dict[str, str], profile: dict[str, Any] | None) -> None:
    """Refuse a device that does not match its profile (TensorRT major, power mode)."""
    if not profile:
        return
    want = profile.get("tensorrt_major")
    have = info.get("tensorrt") or info.get("tensorrt_python")
    if want and have and int(have.split(".")[0]) != want:
        raise RemoteError(
            f"device profile {profile['name']} expects TensorRT {want}.x; the device has {have}"
        )
    mode = profile.get("power_mode")
    if mode and info.get("power_mode") and info["power_mode"] != mode:
        raise RemoteError(
            f"device profile {profile['name']} requires power mode {mode}; the device is in "
            f"{info['power_mode']} (set it with `sudo nvpmodel -m <id>`, see `nvpmodel -p --verbose`)"
        )


def _with_power(script: str, info: dict[str, str], workdir: str) -> str:
    if "tegrastats" not in info:
        return script
    log = f"{workdir}/power.log"
    return (
        f"{shlex.quote(info['tegrastats'])} --interval 100 > {log} 2>/dev/null & TS=$!; "
        f"{script}; rc=$?; kill $TS 2>/dev/null; exit $rc"
    )


def bench_ssh(
    path: Path | str,
    batch_sizes: list[int],
    settings: BenchSettings,
    host: str | None = None,
    user: str | None = None,
    port: int | None = None,
    identity_file: str | None = None,
    known_hosts: str | None = None,
    ssh_config: str | None = None,
    remote_python: str = "python3",
    remote_backend: str = "auto",
    precision: str = "fp32",
    device_profile: str | None = None,
    timeout_s: float = 1800,
) -> list[dict[str, Any]]:
    """Benchmark `path` on `host` at each batch size; one result per batch size."""
    from compress.deploy.devices import load_profile

    path = check_model_file(path)
    if not host:
        raise InputError("backend ssh: --host (or ssh.host in a bench stage) is required")
    if remote_backend not in ("auto", "compress", "trtexec"):
        raise InputError(f"remote_backend {remote_backend!r}: expected auto, compress or trtexec")
    profile = load_profile(device_profile) if device_profile else None
    target = SSHTarget(host, user, port, identity_file, known_hosts, ssh_config,
                       remote_python=remote_python, timeout_s=timeout_s)  # fmt: skip
    info = probe(target)
    check_profile(info, profile)
    use = choose_remote(info, remote_backend, remote_python, host)
    files = [path, *external_data_files(path)]
    workdir = target.ssh("mktemp -d -t compress-bench.XXXXXXXX", timeout=60).strip()
    if not workdir.startswith("/"):
        raise RemoteError(f"{host}: mktemp gave {workdir!r}")
    try:
        target.scp([str(f) for f in files], target.remote(workdir + "/"))
        remote_model = f"{workdir}/{path.name}"
        with tempfile.TemporaryDirectory(prefix="compress-ssh-") as local:
            if use == "compress":
                results = _remote_compress(
                    target,
                    info,
                    workdir,
                    remote_model,
                    batch_sizes,
                    settings,
                    precision,
                    Path(local),
                )
            else:
                results = _remote_trtexec(
                    target,
                    info,
                    workdir,
                    remote_model,
                    path,
                    batch_sizes,
                    settings,
                    precision,
                    Path(local),
                )
    finally:
        target.ssh(f"rm -rf {shlex.quote(workdir)}", timeout=60, check=False)
    device = info.get("model") or info.get("gpu") or info.get("arch", "unknown")
    for r in results:
        r.update(
            backend="ssh",
            remote_backend=r.get("backend_remote", use),
            host=host,
            device=device,
            device_info=info,
            device_profile=profile["name"] if profile else None,
        )
    return results


def choose_remote(info: dict[str, str], wanted: str, remote_python: str, host: str) -> str:
    """`compress` or `trtexec`: what runs the benchmark on the device (auto: compress first)."""
    have = [tool for tool in ("compress", "trtexec") if tool in info]
    if wanted in have or (wanted == "auto" and have):
        return wanted if wanted != "auto" else have[0]
    missing = "neither compress nor trtexec" if wanted == "auto" else f"no {wanted}"
    raise RemoteError(
        f"{host}: the device has {missing} (compress tried as `{remote_python} -m compress`); "
        "install compress there or set remote_python to the interpreter that has it, or install "
        "TensorRT's trtexec"
    )


def _fetch_power(target, info, workdir, local: Path) -> dict[str, Any] | None:
    if "tegrastats" not in info:
        return None
    target.scp([target.remote(f"{workdir}/power.log")], str(local / "power.log"))
    return parse_tegrastats((local / "power.log").read_text())


def _remote_compress(target, info, workdir, remote_model, batch_sizes, settings, precision, local):
    # TensorRT when the device has it (a Jetson or a CUDA host), else onnxruntime.
    has_gpu = "gpu" in info or "l4t" in info
    backend = "tensorrt" if "tensorrt_python" in info and has_gpu else "onnxruntime"
    results = []
    for b in batch_sizes:
        args = [
            "-m", "compress", "bench", remote_model, "--backend", backend, "--json",
            "--batch-size", str(b), "--warmup", str(settings.warmup),
            "--min-iters", str(settings.min_iters), "--min-duration", str(settings.min_duration_s),
            "--repeats", str(settings.repeats),
        ]  # fmt: skip
        if settings.threads:
            args += ["--threads", str(settings.threads)]
        if backend == "tensorrt":
            args += ["--precision", precision]
        cmd = f"cd {shlex.quote(workdir)} && {target.remote_python} " + " ".join(
            map(shlex.quote, args)
        )
        out = target.ssh(_with_power(cmd, info, workdir))
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise RemoteError(
                f"{target.host}: remote compress bench printed no JSON: {out[-300:]!r}"
            ) from None
        result["backend_remote"] = f"compress {info.get('compress')} --backend {backend}"
        result["remote_command"] = cmd
        results.append(add_energy(result, _fetch_power(target, info, workdir, local)))
    return results


def _remote_trtexec(
    target, info, workdir, remote_model, path, batch_sizes, settings, precision, local
):
    exe = shlex.quote(info["trtexec"])
    major = int(info.get("tensorrt", "10").split(".")[0])
    name, dims = onnx_input(path)
    shapes = {b: input_shape_for(path, dims, b) for b in batch_sizes}
    engine = f"{workdir}/model.engine"
    build = build_flags(
        major, remote_model, engine, precision, name,
        shapes[min(batch_sizes)], shapes[min(batch_sizes)], shapes[max(batch_sizes)],
        timing_cache=f"{workdir}/timing.cache",
    )  # fmt: skip
    log = f"{workdir}/build.log"
    target.ssh(
        f"{exe} {' '.join(map(shlex.quote, build))} > {log} 2>&1 || "
        f"{{ echo 'trtexec engine build failed:'; tail -n 20 {log}; exit 3; }}"
    )
    results = []
    for b in batch_sizes:
        times, summaries, flags = [], [], []
        for i in range(settings.repeats):
            times_path = f"{workdir}/times_{b}_{i}.json"
            flags = run_flags(major, engine, name, shapes[b], settings, times_path)
            out = target.ssh(
                _with_power(f"{exe} " + " ".join(map(shlex.quote, flags)), info, workdir)
            )
            summaries.append(parse_summary(out))
            target.scp([target.remote(times_path)], str(local / "times.json"))
            times.append(parse_times((local / "times.json").read_text()))
        result = result_from_times(
            times, summaries, b,
            backend="ssh", precision=precision, batch_size=b, input_shape=shapes[b],
            timed="trtexec latencyMs per iteration on the device (GPU compute, no host copies)",
            flags={"build": build, "run": flags, "repeats": settings.repeats},
            tensorrt_version=info.get("tensorrt"),
        )  # fmt: skip
        result["backend_remote"] = f"trtexec {info.get('tensorrt')}"
        results.append(add_energy(result, _fetch_power(target, info, workdir, local)))
    return results
