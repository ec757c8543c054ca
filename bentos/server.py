"""Run `bentoml serve` as a child process: started in its own session with default signal
handlers, ready when `/readyz` answers, stopped by its own process group — never by name.

Background processes started from a non-interactive shell here ignore SIGINT/SIGTERM unless
the handlers are reset (STACK.md), so a plain Popen would leave servers behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class BentoServer:
    """`with BentoServer("bonmf:latest") as server: server.url` — a served Bento (a tag, an
    archive path or a service like `bentos.service:Recommendations`)."""

    def __init__(self, target: str, *, host: str = "127.0.0.1", port: int | None = None,
                 env: dict | None = None, cwd: str | Path | None = None,
                 ready_timeout: float = 180.0):
        self.target, self.host = target, host
        self.port = port or free_port(host)
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
        self.cwd, self.ready_timeout = cwd, ready_timeout
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="bentoml-serve-", suffix=".log",
                                               delete=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BentoServer":
        bentoml = Path(sys.executable).with_name("bentoml")
        command = [str(bentoml)] if bentoml.exists() else [sys.executable, "-m", "bentoml"]
        self.proc = subprocess.Popen(
            [*command, "serve", self.target, "--host", self.host, "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
            start_new_session=True, preexec_fn=_default_signals)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve {self.target} exited with "
                                   f"{self.proc.returncode}:\n{self.log_tail()}")
            if "Initializing service error" in self.log_tail(200_000):
                # BentoML keeps restarting a worker whose service fails to load: say why now
                self.stop()
                raise RuntimeError(f"bentoml serve {self.target}: the service failed to "
                                   f"load:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"bentoml serve {self.target} not ready after "
                           f"{self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "BentoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
