"""The ssh backend end to end against a real OpenSSH server started on localhost by the test.

The server runs as the current user on a free port with a throwaway host key, client key and
known_hosts file; the client reaches it through an alias in a generated ssh config file. The
remote side runs `compress bench --backend onnxruntime` from this checkout (`remote_python`).
Its PATH starts with a folder holding stand-ins for `sudo` and `jetson_clocks`: jetson_clocks
succeeds only while the file `clocks_ok` exists in the server's folder.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compress.deploy.backends import bench
from compress.deploy.jetson import probe
from compress.deploy.onnx_export import onnxruntime_session
from compress.deploy.remote import SSHOptions, upload
from compress.deploy.ssh import SSHTarget
from compress.errors import InputError
from tests.conftest import REPO, run_cli
from tests.deploy.onnx_models import WEIGHTS, tiny_onnx

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _start_sshd(d: Path, sftp: bool = True):
    """sshd on a free 127.0.0.1 port, configured in `d`, and an ssh config whose alias `device`
    points at it; `sftp: False` leaves out the SFTP subsystem (scp then needs `scp -O`)."""
    if not Path(SSHD).exists() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server/client not installed (Debian: apt-get install openssh-server)")
    os.chmod(d, 0o700)
    _keygen(d / "host_key")
    _keygen(d / "id")
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    bin_dir = d / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "sudo", '[ "$1" = -n ] && shift; exec "$@"')
    _script(
        bin_dir / "jetson_clocks",
        f'[ -e {d}/clocks_ok ] && exit 0; echo "jetson_clocks: cannot set clocks" >&2; exit 1',
    )
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\n"
        + ("Subsystem sftp internal-sftp\n" if sftp else "")
        + f"SetEnv PATH={bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "sshd.log", "w"),  # noqa: SIM115 - closed with the process
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd could not start: {(d / 'sshd.log').read_text()[-500:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.skip("sshd did not listen within 10 s")
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (d / "config").write_text(
        f"Host device\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
        f"  IdentityFile {d}/id\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
    )
    return proc, {"dir": d, "port": port, "config": str(d / "config")}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A running sshd on 127.0.0.1 and an ssh config whose alias `device` points at it."""
    proc, server = _start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd_without_sftp(tmp_path_factory):
    """The same without the SFTP subsystem: OpenSSH 9's scp fails there unless it uses `-O`."""
    proc, server = _start_sshd(tmp_path_factory.mktemp("sshd_no_sftp"), sftp=False)
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def onnx_with_external_data(tmp_path_factory, resnet20_weights) -> Path:
    """A real exported CIFAR ResNet-20 whose weights live in `model.onnx.data` beside it."""
    import onnx

    from compress.deploy.onnx_export import export_onnx
    from compress.models import create_model

    d = tmp_path_factory.mktemp("model")
    model = create_model("cifar_resnet20", weights=resnet20_weights)[0].eval()
    plain = export_onnx(model, d / "plain.onnx", (3, 32, 32))
    proto = onnx.load(str(plain))
    onnx.save_model(
        proto,
        str(d / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    plain.unlink()
    assert (d / "model.onnx.data").stat().st_size > (d / "model.onnx").stat().st_size
    return d / "model.onnx"


def _remote_temp_dirs() -> set[str]:
    return {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("compress-bench.*")}


REMOTE_PYTHON = f"env PYTHONPATH={REPO} {sys.executable}"
QUICK = ["--warmup", "2", "--min-iters", "10", "--min-duration", "0.1", "--repeats", "2"]


def test_ssh_bench_runs_remote_compress_through_a_config_alias(sshd, onnx_with_external_data):
    before = _remote_temp_dirs()
    result = run_cli(
        "bench", str(onnx_with_external_data), "--backend", "ssh", "--host", "device",
        "--ssh-config", sshd["config"], "--remote-python", REMOTE_PYTHON,
        "--batch-size", "1,2", *QUICK, "--json", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["backend"] == "ssh" and r["host"] == "device"
        assert r["remote_backend"].startswith("compress") and "onnxruntime" in r["remote_backend"]
        assert r["provider"] == "CPUExecutionProvider" and r["input_shape"][0] == r["batch_size"]
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_ips"] > 0
        assert r["iterations"] >= 20 and r["flags"]["repeats"] == 2
        assert "compress" in r["device_info"] and "energy_per_inference_mj" not in r
        assert r["clocks_locked"] is None  # not asked for: not tried
    assert _remote_temp_dirs() == before  # the remote temporary folder was removed


def test_ssh_bench_reports_a_missing_remote_tool(sshd, onnx_with_external_data):
    result = run_cli(
        "bench", str(onnx_with_external_data), "--backend", "ssh", "--host", "device",
        "--ssh-config", sshd["config"], "--remote-python", "/nonexistent/python", *QUICK,
    )  # fmt: skip
    assert result.returncode == 1
    assert "neither compress" in result.stderr and "nor trtexec" in result.stderr


def test_ssh_bench_reports_a_refused_connection(sshd, onnx_with_external_data):
    closed = _free_port()
    result = run_cli(
        "bench", str(onnx_with_external_data), "--backend", "ssh", "--host", "127.0.0.1",
        "--port", str(closed), "--known-hosts", str(sshd["dir"] / "known_hosts"), *QUICK,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"127.0.0.1 port {closed}: connection refused" in result.stderr


def test_ssh_bench_refuses_an_unknown_host_key(sshd, onnx_with_external_data, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = run_cli(
        "bench", str(onnx_with_external_data), "--backend", "ssh", "--host", "device",
        "--ssh-config", sshd["config"], "--known-hosts", str(empty), *QUICK,
    )  # fmt: skip
    assert result.returncode == 1
    assert "host key not known or changed" in result.stderr


def test_ssh_bench_locks_the_clocks_and_records_whether_it_could(sshd, onnx_with_external_data):
    """A device profile asks for jetson_clocks (and sets long timings, which the flags override);
    `sudo -n jetson_clocks` failing gives a warning and `clocks_locked: false`, not a failure."""
    args = [
        "bench", str(onnx_with_external_data), "--backend", "ssh", "--host", "device",
        "--ssh-config", sshd["config"], "--remote-python", REMOTE_PYTHON, *QUICK, "--json",
    ]  # fmt: skip
    result = run_cli(*args, "--device-profile", "orin_nano_jp6", timeout=300)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["clocks_locked"] is False and r["device_profile"] == "orin_nano_jp6"
    assert "clocks not locked, `sudo -n jetson_clocks` failed" in result.stderr
    assert "jetson_clocks: cannot set clocks" in result.stderr
    assert r["flags"]["repeats"] == 2 and r["min_iters"] == 10  # the flags win over the profile
    (sshd["dir"] / "clocks_ok").touch()
    try:
        result = run_cli(*args, "--jetson-clocks", timeout=300)
    finally:
        (sshd["dir"] / "clocks_ok").unlink()
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["clocks_locked"] is True and r["device_profile"] is None
    assert "clocks not locked" not in result.stderr


def _target(server, **kwargs) -> SSHTarget:
    return SSHTarget("device", ssh_config=server["config"], timeout_s=60, **kwargs)


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_ssh_bench_copies_no_external_data_from_outside_the_model_folder(sshd, tmp_path, outside):
    """A crafted model names a file outside its folder as external data: refused before anything
    connects, and the copy itself refuses it too: nothing reaches the remote folder."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the device\n")
    location = "../secret.txt" if outside == "relative" else str(secret)
    model = tiny_onnx(tmp_path / "model" / "m.onnx", location, write_data=False)
    before = _remote_temp_dirs()
    options = SSHOptions(
        host="device", ssh_config=sshd["config"], remote_python=REMOTE_PYTHON,
        warmup=1, min_iters=2, min_duration_s=0, repeats=1,
    )  # fmt: skip
    refused = f"{model}: external data location {location!r} of tensor 'w' is outside"
    with pytest.raises(InputError, match=re.escape(refused)):
        bench(model, "ssh", options)
    assert _remote_temp_dirs() == before
    target = _target(sshd)
    workdir = target.ssh("mktemp -d -t compress-test.XXXXXXXX").strip()
    with pytest.raises(InputError, match=re.escape(refused)):
        upload(target, model, workdir)
    assert os.listdir(workdir) == []  # the device is this machine
    os.rmdir(workdir)


def test_remote_python_runs_as_words_not_as_shell(sshd, tmp_path, capsys):
    from compress.cli import main

    marker = tmp_path / "MARKER"
    for prefix in (f"python3; touch {marker}", f"python3; touch {marker}; python3"):
        info = probe(_target(sshd, remote_python=prefix))
        assert "compress" not in info and not marker.exists()
    model = tiny_onnx(tmp_path / "m.onnx")
    argv = ["bench", str(model), "--backend", "ssh", "--host", "device",
            "--ssh-config", sshd["config"], "--remote-python", f"python3; touch {marker}; python3"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "failed: " in err and "neither compress nor trtexec" in err and not marker.exists()
    target = _target(sshd, remote_python=f'env FOO="a b" {sys.executable}')
    out = target.ssh(f"{target.python()} -c 'import os; print(os.environ[\"FOO\"])'")
    assert out == "a b\n"


def test_copies_to_a_host_without_sftp_use_the_scp_protocol(sshd_without_sftp, tmp_path):
    """OpenSSH 9's scp fails there with `scp: Connection closed`; the copy retries with `scp -O`
    and keeps it. External data in a subfolder lands in the same subfolder on the device."""
    model = tiny_onnx(tmp_path / "model" / "m.onnx", "weights/w.bin")
    target = _target(sshd_without_sftp)
    workdir = target.ssh("mktemp -d -t compress-test.XXXXXXXX").strip()
    remote_model = upload(target, model, workdir)
    assert target.legacy_scp and remote_model == f"{workdir}/m.onnx"
    copied = sorted(str(p.relative_to(workdir)) for p in Path(workdir).rglob("*") if p.is_file())
    assert copied == ["m.onnx", "weights/w.bin"]
    target.scp([target.remote(f"{workdir}/weights/w.bin")], str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "model/weights/w.bin").read_bytes()
    session = onnxruntime_session(remote_model, 1)  # the copy is a whole model
    out = session.run(None, {"input": np.zeros((1, 4), np.float32)})[0]
    np.testing.assert_array_equal(out[0], WEIGHTS)
    shutil.rmtree(workdir)
