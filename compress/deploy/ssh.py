"""SSH transport with the system OpenSSH client: commands and copies to a remote device.

Host, user, port, key and known-hosts file come from the arguments or from `~/.ssh/config`
(HOST may be an alias there). BatchMode is on (no password prompts; nothing is stored) and host
keys are checked strictly. Every failure of ssh itself becomes one RemoteError that says why.

What comes from the user never reaches a command line as anything but itself: the host and user
are refused when they could read as an option (a leading `-`) or split a word (whitespace,
control characters), `--` ends the options of every ssh and scp call, and `remote_python` is split
into words that are quoted one by one in the remote command.
"""

from __future__ import annotations

import shlex
import subprocess
import unicodedata
from dataclasses import dataclass, field

from compress.errors import InputError, StageFailed
from compress.log import logger


class RemoteError(StageFailed):
    """The remote device could not be reached or lacks a tool: exit code 1 with the reason."""


def destination_problem(value: str) -> str | None:
    """What is wrong with `value` as a host or user name on an ssh command line, or None."""
    if not value:
        return "empty"
    if value.startswith("-"):
        return "must not begin with '-' (ssh would read it as an option)"
    if any(c.isspace() or unicodedata.category(c).startswith("C") for c in value):
        return "must not contain whitespace or control characters"
    return None


def check_destination(value: str, name: str) -> str:
    """`value` (the host or user, called `name` in the message) unless `destination_problem`
    finds something: InputError then."""
    problem = destination_problem(value)
    if problem:
        raise InputError(f"{name} {value!r}: {problem}")
    return value


def command_words(command: str, name: str = "remote_python") -> list[str]:
    """`command` split into words as a POSIX shell would (quotes, no expansion); InputError naming
    `name` for unbalanced quotes or no words."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise InputError(f"{name} {command!r}: cannot be split into words ({e})") from None
    if not words:
        raise InputError(f"{name} {command!r}: no words (expected a command such as python3)")
    return words


@dataclass
class SSHTarget:
    """Where to connect. Unset values fall back to `~/.ssh/config` (or `ssh_config`).

    `remote_python` is a command prefix (`python3`, `/opt/venv/bin/python`,
    `env PYTHONPATH=/src python3`): its words are quoted one by one, so no shell syntax in it runs.
    `legacy_scp`: copy with the SCP protocol (`scp -O`); set by the first copy to a host without
    an SFTP server, and kept for this target's later copies.
    """

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
    legacy_scp: bool = False

    def __post_init__(self) -> None:
        check_destination(self.host, "host")
        if self.user is not None:
            check_destination(self.user, "user")
        command_words(self.remote_python)

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

    def python(self) -> str:
        """`remote_python` for a remote shell command: each word quoted."""
        return " ".join(shlex.quote(w) for w in command_words(self.remote_python))

    def ssh_argv(self, script: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *self.options(), *port, "--", self.host, script]

    def ssh(self, script: str, timeout: float | None = None, check: bool = True) -> str:
        """Run `script` with the remote user's shell; return stdout."""
        proc = self._run(self.ssh_argv(script), timeout)
        if proc.returncode == 255:  # ssh's own failure, not the remote command's
            raise RemoteError(connection_problem(self, proc.stderr))
        if check and proc.returncode != 0:
            raise RemoteError(f"ssh {self.host}: `{script[:80]}` failed: {_tail(proc)}")
        return proc.stdout

    def scp_argv(self, sources: list[str], dest: str, legacy: bool = False) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        protocol = ["-O"] if legacy else []
        # no -q: it silences ssh's diagnostics too, which tell a missing SFTP server apart
        return ["scp", "-B", *protocol, *self.options(), *port, "--", *sources, dest]

    def scp(self, sources: list[str], dest: str, timeout: float | None = None) -> None:
        """Copy `sources` to `dest` (local paths should be absolute; remote ones `remote(path)`).

        OpenSSH 9's scp speaks SFTP; a host without the SFTP subsystem gets the SCP protocol
        (`scp -O`) instead, from then on for this target."""
        proc = self._run(self.scp_argv(sources, dest, self.legacy_scp), timeout)
        if proc.returncode != 0 and not self.legacy_scp and _no_sftp(proc.stderr):
            legacy = self._run(self.scp_argv(sources, dest, legacy=True), timeout)
            if legacy.returncode != 0:
                raise RemoteError(
                    f"scp to/from {self.host}: the host has no SFTP server (no `Subsystem sftp` "
                    "in its sshd_config) and the legacy SCP protocol (scp -O) failed too "
                    f"({_tail(legacy)}); enable the SFTP subsystem there, or install scp on it"
                )
            logger.info(f"ssh {self.host}: no SFTP server; copying with the SCP protocol (scp -O)")
            self.legacy_scp = True
            return
        if proc.returncode == 255:
            raise RemoteError(connection_problem(self, proc.stderr))
        if proc.returncode != 0:
            raise RemoteError(f"scp to/from {self.host} failed: {_tail(proc)}")

    def remote(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{host}:{path}"

    def _run(self, cmd: list[str], timeout: float | None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
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


def _no_sftp(stderr: str) -> bool:
    """Whether scp failed because the server has no SFTP subsystem (OpenSSH 9 scp uses SFTP)."""
    text = stderr.strip()
    return "subsystem request failed" in text or text == "scp: Connection closed"


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
