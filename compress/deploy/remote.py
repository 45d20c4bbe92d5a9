"""The ssh bench backend: time a model on a remote device (e.g. a Jetson) over SSH.

The flow: probe the device (JetPack/L4T, TensorRT, GPU, power mode, tools) and check it against
its device profile, lock the clocks when asked, copy the ONNX model and its external data to a
temporary folder, run `compress bench` there when compress is installed (else build and time with
trtexec), sample power with tegrastats where present, copy the results back, and remove the
temporary folder.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.config import StrictModel
from compress.deploy.devices import apply_profile, load_profile, profile_names
from compress.deploy.external_data import external_data_files
from compress.deploy.jetson import (
    add_energy,
    check_profile,
    fetch_power,
    jetson_clocks,
    probe,
    with_power,
)
from compress.deploy.ssh import RemoteError, SSHTarget, command_words, destination_problem
from compress.deploy.timing import (
    DEFAULT_PRECISION,
    Backend,
    BenchSettings,
    Precision,
    TimeoutS,
    check_model_file,
    input_shape_for,
)
from compress.deploy.trtexec import (
    build_flags,
    onnx_input,
    parse_summary,
    parse_times,
    result_from_times,
    run_flags,
)
from compress.errors import InputError
from compress.log import logger

# Names that mean the same to a remote shell and to SFTP (scp -O hands paths to the shell).
_SAFE_NAME = re.compile(r"[A-Za-z0-9._+][A-Za-z0-9._+-]*")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]+")


class SSHDevice(StrictModel):
    """A remote device for `backend: ssh`; unset values come from `~/.ssh/config`."""

    host: str = Field(description="Host name or ~/.ssh/config alias.")
    user: str | None = Field(None, description="Login user.")
    port: int | None = Field(None, gt=0, lt=65536, description="SSH port.")
    identity_file: str | None = Field(None, description="Private key file (no passwords are used).")
    known_hosts: str | None = Field(None, description="known_hosts file; host keys are checked.")
    ssh_config: str | None = Field(None, description="ssh config file instead of ~/.ssh/config.")
    remote_python: str = Field(
        "python3",
        description="Remote interpreter that has compress, as a command prefix split into words "
        "like a shell does (`/opt/venv/bin/python`, `env PYTHONPATH=/src python3`); each word is "
        "passed as is: no shell syntax ($VAR, ~, ;, |) is expanded or run.",
    )
    remote_backend: Literal["auto", "compress", "trtexec"] = Field(
        "auto", description="auto: compress bench when installed there, else trtexec."
    )
    device_profile: str | None = Field(
        None,
        description=f"Jetson device profile ({', '.join(profile_names())}) or a YAML file.",
    )
    jetson_clocks: bool | None = Field(
        None,
        description="Lock the clocks with `sudo -n jetson_clocks` before timing "
        "(default: the device profile's, else no).",
    )
    timeout_s: TimeoutS = 1800

    @field_validator("host", "user")
    @classmethod
    def _plain_destination(cls, v: str | None) -> str | None:
        problem = None if v is None else destination_problem(v)
        if problem:
            raise ValueError(f"{v!r}: {problem}")
        return v

    @field_validator("remote_python")
    @classmethod
    def _command_prefix(cls, v: str) -> str:
        try:
            command_words(v)
        except InputError as e:
            raise ValueError(str(e).removeprefix("remote_python ")) from None
        return v

    @field_validator("device_profile")
    @classmethod
    def _known_profile(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                load_profile(v)
            except InputError as e:
                raise ValueError(str(e)) from None
        return v


class SSHOptions(BenchSettings, SSHDevice):
    """Options of the ssh backend. With `device_profile`, the profile supplies the timing
    settings, `precision` and `jetson_clocks` that are not given."""

    precision: Precision = None

    @model_validator(mode="before")
    @classmethod
    def _apply_device_profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("device_profile"):
            try:
                return apply_profile(data)
            except InputError:
                return data  # the device_profile field says what is wrong
        return data


@dataclass
class RemoteRun:
    """A benchmark on the device: where it is, what it has, and the folders it uses."""

    target: SSHTarget
    info: dict[str, str]
    workdir: str
    local: Path

    def run(self, script: str) -> str:
        """`script` on the device, with power sampled while it runs (where tegrastats is)."""
        return self.target.ssh(with_power(script, self.info, self.workdir))

    def power(self) -> dict[str, Any] | None:
        return fetch_power(self.target, self.info, self.workdir, self.local)


def upload(target: SSHTarget, path: Path, workdir: str) -> str:
    """Copy the model and its external-data files (checked: only files inside its folder) to
    `workdir` on the device, keeping their relative paths; return the remote model path."""
    data = external_data_files(path)
    folders: dict[str, list[str]] = {"": [str(path.absolute())]}
    for location, file in data.items():
        folder = str(PurePosixPath(location).parent)
        folder = "" if folder == "." else folder
        if folder and not all(_SAFE_NAME.fullmatch(part) for part in folder.split("/")):
            raise InputError(
                f"{path}: external data folder {folder!r}: the ssh backend copies subfolders "
                "whose names use only letters, digits and ._+-"
            )
        folders.setdefault(folder, []).append(str(file))
    made = [f"{workdir}/{folder}" for folder in folders if folder]
    if made:
        target.ssh("mkdir -p -- " + " ".join(map(shlex.quote, made)), timeout=60)
    for folder, sources in folders.items():
        target.scp(sources, target.remote(f"{workdir}/{folder}".rstrip("/") + "/"))
    return f"{workdir}/{path.name}"


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


def lock_clocks(target: SSHTarget) -> bool:
    """Try `sudo -n jetson_clocks`; warn when the clocks could not be locked."""
    locked, why = jetson_clocks(target)
    if not locked:
        logger.warning(
            f"ssh {target.host}: clocks not locked, `sudo -n jetson_clocks` failed ({why}); "
            "timing at the current clocks (locking needs a passwordless sudo rule for it)"
        )
    return locked


def bench_ssh(
    path: Path | str, batch_sizes: list[int], options: SSHOptions
) -> list[dict[str, Any]]:
    """Benchmark `path` on `options.host` at each batch size; one result per batch size."""
    path = check_model_file(path)
    profile = load_profile(options.device_profile) if options.device_profile else None
    target = SSHTarget(
        options.host,
        options.user,
        options.port,
        options.identity_file,
        options.known_hosts,
        options.ssh_config,
        remote_python=options.remote_python,
        timeout_s=options.timeout_s,
    )
    external_data_files(path)  # refused before anything connects
    info = probe(target)
    check_profile(info, profile)
    use = choose_remote(info, options.remote_backend, options.remote_python, options.host)
    clocks_locked = lock_clocks(target) if options.jetson_clocks else None
    workdir = target.ssh("mktemp -d -t compress-bench.XXXXXXXX", timeout=60).strip()
    if not _SAFE_PATH.fullmatch(workdir):  # it goes into remote commands and scp paths
        raise RemoteError(
            f"{options.host}: mktemp gave {workdir!r}, not an absolute path of letters, digits "
            "and ._+-/ (check TMPDIR there)"
        )
    try:
        remote_model = upload(target, path, workdir)
        with tempfile.TemporaryDirectory(prefix="compress-ssh-") as local:
            remote = RemoteRun(target, info, workdir, Path(local))
            if use == "compress":
                results = _remote_compress(remote, remote_model, batch_sizes, options)
            else:
                results = _remote_trtexec(remote, remote_model, path, batch_sizes, options)
    finally:
        target.ssh(f"rm -rf {shlex.quote(workdir)}", timeout=60, check=False)
    device = info.get("model") or info.get("gpu") or info.get("arch", "unknown")
    for r in results:
        r.update(
            backend="ssh",
            remote_backend=r.get("backend_remote", use),
            host=options.host,
            device=device,
            device_info=info,
            device_profile=profile.name if profile else None,
            clocks_locked=clocks_locked,
        )
    return results


def _remote_compress(
    remote: RemoteRun, remote_model: str, batch_sizes: list[int], options: SSHOptions
) -> list[dict[str, Any]]:
    # TensorRT when the device has it (a Jetson or a CUDA host), else onnxruntime.
    info, target = remote.info, remote.target
    has_gpu = "gpu" in info or "l4t" in info
    backend = "tensorrt" if "tensorrt_python" in info and has_gpu else "onnxruntime"
    results = []
    for b in batch_sizes:
        # flag names that every compress version takes (`--min-duration` included)
        args = [
            "-m", "compress", "bench", remote_model, "--backend", backend, "--json",
            "--batch-size", str(b), "--warmup", str(options.warmup),
            "--min-iters", str(options.min_iters), "--min-duration", str(options.min_duration_s),
            "--repeats", str(options.repeats),
        ]  # fmt: skip
        if options.threads:
            args += ["--threads", str(options.threads)]
        if backend == "tensorrt":
            args += ["--precision", options.precision or DEFAULT_PRECISION]
        cmd = f"cd {shlex.quote(remote.workdir)} && {target.python()} " + " ".join(
            map(shlex.quote, args)
        )
        out = remote.run(cmd)
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise RemoteError(
                f"{target.host}: remote compress bench printed no JSON: {out[-300:]!r}"
            ) from None
        result["backend_remote"] = f"compress {info.get('compress')} --backend {backend}"
        result["remote_command"] = cmd
        results.append(add_energy(result, remote.power()))
    return results


def _remote_trtexec(
    remote: RemoteRun,
    remote_model: str,
    path: Path,
    batch_sizes: list[int],
    options: SSHOptions,
) -> list[dict[str, Any]]:
    info, target, workdir = remote.info, remote.target, remote.workdir
    precision = options.precision or DEFAULT_PRECISION
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
    log = shlex.quote(f"{workdir}/build.log")
    target.ssh(
        f"{exe} {' '.join(map(shlex.quote, build))} > {log} 2>&1 || "
        f"{{ echo 'trtexec engine build failed:'; tail -n 20 {log}; exit 3; }}"
    )
    results = []
    for b in batch_sizes:
        times, summaries, flags = [], [], []
        for i in range(options.repeats):
            times_path = f"{workdir}/times_{b}_{i}.json"
            flags = run_flags(major, engine, name, shapes[b], options, times_path)
            out = remote.run(f"{exe} " + " ".join(map(shlex.quote, flags)))
            summaries.append(parse_summary(out))
            target.scp([target.remote(times_path)], str(remote.local / "times.json"))
            times.append(parse_times((remote.local / "times.json").read_text()))
        result = result_from_times(
            times, summaries, b,
            backend="ssh", precision=precision, batch_size=b, input_shape=shapes[b],
            timed="trtexec latencyMs per iteration on the device (GPU compute, no host copies)",
            flags={"build": build, "run": flags, "repeats": options.repeats},
            tensorrt_version=info.get("tensorrt"),
        )  # fmt: skip
        result["backend_remote"] = f"trtexec {info.get('tensorrt')}"
        results.append(add_energy(result, remote.power()))
    return results


BACKEND = Backend("ssh", SSHOptions, bench_ssh, "a remote device over SSH (e.g. a Jetson)")
