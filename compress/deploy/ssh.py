"""SSH transport with the system OpenSSH client: commands and copies to a remote device.

Host, user, port, key and known-hosts file come from the arguments or from `~/.ssh/config`
(HOST may be an alias there). BatchMode is on (no password prompts; nothing is stored) and host
keys are checked strictly. Every failure of ssh itself becomes one RemoteError that says why.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from compress.errors import StageFailed


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
