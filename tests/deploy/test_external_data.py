"""Crafted models and hostile options: external data outside the model's folder is read by no
backend, hosts and users that read as ssh options are refused, `remote_python` is quoted word by
word, and scp falls back to the SCP protocol where the host has no SFTP server. No server is
needed here (tests/deploy/test_ssh.py has the same against a real sshd)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from compress.deploy.backends import bench
from compress.deploy.external_data import external_data_files
from compress.deploy.remote import SSHOptions
from compress.deploy.ssh import RemoteError, SSHTarget
from compress.errors import InputError
from tests.deploy.onnx_models import WEIGHTS, tiny_onnx

QUICK = {"warmup": 1, "min_iters": 2, "min_duration_s": 0, "repeats": 1, "threads": 1}


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file beside (not inside) the model folder `tmp_path/model`."""
    path = tmp_path / "secret.bin"
    path.write_bytes(WEIGHTS.tobytes())
    return path


def test_external_data_inside_the_model_folder_is_read(tmp_path):
    from compress.deploy.onnx_export import onnxruntime_session

    folder = tmp_path / "model"
    for location in ("w.bin", "./w.bin", "weights/w.bin"):
        model = tiny_onnx(folder / "m.onnx", location)
        normal = location.removeprefix("./")
        assert external_data_files(model) == {normal: folder.absolute() / normal}
        out = onnxruntime_session(model, 1).run(None, {"input": np.zeros((2, 4), np.float32)})[0]
        np.testing.assert_array_equal(out, np.stack([WEIGHTS] * 2))
    (folder / "link.bin").symlink_to(folder / "weights" / "w.bin")  # a symlink that stays inside
    assert list(external_data_files(tiny_onnx(folder / "m.onnx", "link.bin"))) == ["link.bin"]
    assert external_data_files(tiny_onnx(folder / "plain.onnx")) == {}
    missing = tiny_onnx(folder / "m.onnx", "gone.bin", write_data=False)
    with pytest.raises(InputError, match="external data file.s. missing: .*gone.bin"):
        external_data_files(missing)


OUTSIDE = [
    "../secret.bin",
    "../../../../../../../../../../etc/hostname",
    "/etc/passwd",
    "SECRET",  # the secret's absolute path
    "weights/../../secret.bin",
    "..\\secret.bin",
    "w.bin\n",
    "",
]


@pytest.mark.parametrize("location", OUTSIDE)
def test_external_data_outside_the_model_folder_is_refused(tmp_path, secret, location):
    location = str(secret) if location == "SECRET" else location
    model = tiny_onnx(tmp_path / "model" / "m.onnx", location, write_data=False)
    with pytest.raises(InputError) as e:
        external_data_files(model)
    assert f"{model}: external data location {location!r} of tensor 'w'" in str(e.value)
    assert "outside the model's folder" in str(e.value)


def test_external_data_through_a_symlink_out_of_the_folder_is_refused(tmp_path, secret):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").symlink_to(secret)
    (folder / "up").symlink_to(tmp_path)
    for location in ("w.bin", "up/secret.bin"):
        model = tiny_onnx(folder / "m.onnx", location, write_data=False)
        with pytest.raises(InputError, match=f"location '{location}' of tensor 'w' is outside"):
            external_data_files(model)


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt", "trtexec", "ssh"])
def test_every_backend_refuses_external_data_outside_the_model_folder(tmp_path, secret, backend):
    """Before anything reads the model (or connects: the ssh host here does not exist)."""
    model = tiny_onnx(tmp_path / "model" / "m.onnx", str(secret), write_data=False)
    options = {**QUICK, **({"host": "no-such-device.invalid"} if backend == "ssh" else {})}
    if backend == "trtexec":
        options["trtexec"] = "/nonexistent/trtexec"
    with pytest.raises(InputError, match=f"{model}: external data location '{secret}'"):
        bench(model, backend, options)


def test_export_and_engine_build_refuse_external_data_outside(tmp_path, secret):
    from compress.deploy.onnx_export import checked_onnx_file
    from compress.deploy.tensorrt import build_engine

    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    refused = pytest.raises(InputError, match="external data location '../secret.bin'")
    with refused, checked_onnx_file(out) as onnx_path:
        tiny_onnx(onnx_path, "../secret.bin", write_data=False)
    assert not out.exists()
    model = tiny_onnx(tmp_path / "model" / "m.onnx", "../secret.bin", write_data=False)
    with pytest.raises(InputError, match="external data location '../secret.bin'"):
        build_engine(model, tmp_path / "m.engine")


HOSTILE_NAMES = [
    "-oProxyCommand=touch X",
    "-p2222",
    "dev ice",
    "dev\tice",
    "dev\nice",
    "dev\x1bice",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hosts_and_users_that_read_as_options_or_split_are_refused(name):
    for field in ("host", "user"):
        fields = {"host": "orin", field: name}
        with pytest.raises(ValidationError, match=f"{field}\n.*{re.escape(name[:3])}"):
            SSHOptions(**fields)
        with pytest.raises(
            InputError, match=re.escape(f"backend ssh: {field}: {name!r}: must not")
        ):
            bench("m.onnx", "ssh", fields)
        with pytest.raises(InputError, match=re.escape(f"{field} {name!r}: must not")):
            SSHTarget(**fields)
    with pytest.raises(InputError, match="host '': empty"):
        SSHTarget("")


def test_cli_refuses_a_host_that_is_an_ssh_option(tmp_path, monkeypatch, capsys):
    from compress.cli import main

    monkeypatch.chdir(tmp_path)
    model = str(tiny_onnx(tmp_path / "m.onnx"))
    for argv in (["--host", "-oProxyCommand=touch X"], ["--host=-oProxyCommand=touch X"]):
        assert main(["bench", model, "--backend", "ssh", *argv]) == 2
        err = capsys.readouterr().err
        assert (
            "error: backend ssh: --host: '-oProxyCommand=touch X': must not begin with '-'" in err
        )
    assert main(["bench", model, "--backend", "ssh", "--host", "orin", "--user", "a b"]) == 2
    assert "--user: 'a b': must not contain whitespace" in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


class FakeRun:
    """Stands in for subprocess.run in compress.deploy.ssh: records each argv, answers in turn."""

    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers, self.calls = list(answers), []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        rc, stderr = self.answers.pop(0) if self.answers else (0, "")
        return subprocess.CompletedProcess(cmd, rc, "", stderr)


def test_every_ssh_and_scp_command_ends_its_options_before_the_destination(monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr("compress.deploy.ssh.subprocess.run", fake)
    target = SSHTarget("orin", user="nvidia", port=2222, ssh_config="/etc/cfg")
    target.ssh("true")
    target.scp(["/models/m.onnx"], target.remote("/tmp/w/"))
    target.scp([target.remote("/tmp/w/t.json")], "/tmp/t.json")
    ssh, up, down = fake.calls
    assert ssh[-3:] == ["--", "orin", "true"] and ssh.count("--") == 1
    assert up[-3:] == ["--", "/models/m.onnx", "orin:/tmp/w/"]
    assert down[-3:] == ["--", "orin:/tmp/w/t.json", "/tmp/t.json"]
    assert SSHTarget("fe80::1").remote("/x") == "[fe80::1]:/x"


def test_scp_without_sftp_falls_back_to_the_scp_protocol_once(monkeypatch):
    no_sftp = (255, "subsystem request failed on channel 0\nscp: Connection closed\n")
    fake = FakeRun(no_sftp, (0, ""), (0, ""))
    monkeypatch.setattr("compress.deploy.ssh.subprocess.run", fake)
    target = SSHTarget("orin")
    target.scp(["/m.onnx"], "orin:/tmp/")
    assert target.legacy_scp and "-O" not in fake.calls[0] and "-O" in fake.calls[1]
    target.scp(["/m.onnx"], "orin:/tmp/")  # remembered: straight to -O
    assert len(fake.calls) == 3 and "-O" in fake.calls[2]

    fake = FakeRun(no_sftp, (1, "bash: line 1: scp: command not found\n"))
    monkeypatch.setattr("compress.deploy.ssh.subprocess.run", fake)
    with pytest.raises(
        RemoteError, match="no SFTP server .*scp -O.* failed too .*command not found"
    ):
        SSHTarget("orin").scp(["/m.onnx"], "orin:/tmp/")

    refused = (255, "ssh: connect to host orin port 22: Connection refused\nscp: Connection closed")
    fake = FakeRun(refused)
    monkeypatch.setattr("compress.deploy.ssh.subprocess.run", fake)
    with pytest.raises(RemoteError, match="orin: connection refused"):
        SSHTarget("orin").scp(["/m.onnx"], "orin:/tmp/")
    assert len(fake.calls) == 1  # a refused connection is not retried


def test_remote_python_is_a_command_prefix_quoted_word_by_word():
    assert SSHTarget("orin", remote_python='env FOO="a b" python3').python() == (
        "env 'FOO=a b' python3"
    )
    assert SSHTarget("orin", remote_python="python3; touch X").python() == "'python3;' touch X"
    assert SSHTarget("orin", remote_python="/opt/venv/bin/python").python() == (
        "/opt/venv/bin/python"
    )
    with pytest.raises(InputError, match=r"backend ssh: remote_python: 'python3 \"': cannot be "):
        bench("m.onnx", "ssh", {"host": "orin", "remote_python": 'python3 "'})
    with pytest.raises(InputError, match="backend ssh: remote_python: '  ': no words"):
        bench("m.onnx", "ssh", {"host": "orin", "remote_python": "  "})


def test_ssh_copy_refuses_subfolder_names_a_remote_shell_would_read(tmp_path, monkeypatch):
    """`scp -O` hands the destination folder to the remote shell: only plain names get there."""
    from compress.deploy.remote import upload

    fake = FakeRun()
    monkeypatch.setattr("compress.deploy.ssh.subprocess.run", fake)
    model = tiny_onnx(tmp_path / "m.onnx", "we ights;x/w.bin")
    with pytest.raises(InputError, match="external data folder 'we ights;x': the ssh backend"):
        upload(SSHTarget("orin"), model, "/tmp/w")
    assert fake.calls == []  # nothing ran
