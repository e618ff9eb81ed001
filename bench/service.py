"""Start a server pinned to a core, wait until it is ready, stop it with its whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until host:port accepts a TCP connection; give up after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"exited with status {proc.returncode} before {host}:{port} accepted")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ServiceError(f"{host}:{port} did not accept connections within {timeout:g}s") from None
            time.sleep(0.05)


class Service:
    """One server process, in its own session (so its process group can be killed as a whole).

    stdout and stderr go to `<log_dir>/<name>.log` through a drain thread, which also watches for
    `ready_marker` (e.g. laneproxy's `listening on http://`) when one is given.
    """

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, core: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.env = env
        self.argv = (["taskset", "-c", str(core)] if core is not None else []) + argv
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._marker_seen = threading.Event()
        self._marker: bytes | None = None
        self._drain: threading.Thread | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServiceError(f"{self.name} is not running")
        return self.proc.pid  # taskset execs the program, so this is the server's own pid

    def start(self, host: str, port: int, timeout: float = 10.0, ready_marker: str | None = None) -> None:
        self._marker = ready_marker.encode() if ready_marker else None
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=self.env,
        )
        self._drain = threading.Thread(target=self._drain_output, name=f"drain-{self.name}", daemon=True)
        self._drain.start()
        deadline = time.monotonic() + timeout
        try:
            if self._marker is not None:
                while not self._marker_seen.wait(0.05):
                    if self.proc.poll() is not None:
                        raise ServiceError(f"exited with status {self.proc.returncode} before it was ready")
                    if time.monotonic() > deadline:
                        raise ServiceError(f"no {ready_marker!r} line within {timeout:g}s")
            wait_port(host, port, max(0.5, deadline - time.monotonic()), self.proc)
        except ServiceError as exc:
            self.stop()
            raise ServiceError(f"{self.name}: {exc}; see {self.log_path}:\n{self.log_tail()}") from None

    def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "wb") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if self._marker is not None and self._marker in line:
                    self._marker_seen.set()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the process group, then SIGKILL after `grace` seconds."""
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                # the group may outlive its leader (nginx workers): make sure it is gone
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        if proc.poll() is None:
            proc.wait()
        if self._drain is not None:
            self._drain.join(2)
