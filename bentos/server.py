"""Run `bentoml serve` as a child process: started in its own session with default signal
handlers, ready when `/readyz` answers, and stopped as a whole process tree — never by name.

Background processes started from a non-interactive shell here ignore SIGINT/SIGTERM unless
the handlers are reset (STACK.md), so a plain Popen would leave servers behind. Stopping the
process group is not enough either: BentoML starts each worker in a session (and group) of
its own, so the worker would outlive it. `BentoServer.processes()` is the whole server: the
`bentoml serve` process, its descendants, and — should that parent have died (SIGKILL) —
the orphaned workers, found by a marker in their environment.

Every path stops it: `stop()` / the `with` block, the interpreter's exit (atexit), and the
launching thread's death, even by SIGKILL (Linux: the parent-death signal makes
`bentoml serve` shut its workers down; the service sets the same on each worker).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

MARKER_ENV = "BONMF_SERVER_ID"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _child_setup() -> None:
    """In the child before exec: default signal handlers, and (Linux) SIGTERM when the
    thread that started it dies, so a killed test or benchmark leaves no server."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _connect_host(host: str | None) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in (None, "", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if host == "::" else host


class BentoServer:
    """`with BentoServer("bonmf:latest") as server: server.url` — a served Bento (a tag, an
    archive path or a service like `bentos.service:Recommendations`).

    `host`: passed as `--host` (default 127.0.0.1); None serves with the Bento's own
    configured interface (`serving.host`)."""

    def __init__(self, target: str, *, host: str | None = "127.0.0.1", port: int | None = None,
                 env: dict | None = None, cwd: str | Path | None = None,
                 ready_timeout: float = 180.0, stop_timeout: float = 15.0):
        self.target, self.host = target, host
        self.port = port or free_port(_connect_host(host))
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {}),
                    MARKER_ENV: self.marker}
        self.cwd, self.ready_timeout, self.stop_timeout = cwd, ready_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._started_at = 0.0
        self.log = tempfile.NamedTemporaryFile(prefix="bentoml-serve-", suffix=".log",
                                               delete=False)

    @property
    def url(self) -> str:
        host = _connect_host(self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def command(self) -> list[str]:
        bentoml = Path(sys.executable).with_name("bentoml")
        command = [str(bentoml)] if bentoml.exists() else [sys.executable, "-m", "bentoml"]
        command += ["serve", self.target, "--port", str(self.port)]
        return command + (["--host", self.host] if self.host else [])

    def start(self) -> "BentoServer":
        self._started_at = time.time()
        self.proc = subprocess.Popen(
            self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
            cwd=self.cwd, start_new_session=True, preexec_fn=_child_setup)
        atexit.register(self.stop)
        self._wait_ready()
        self.processes()  # remember the workers while their parent can still name them
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"bentoml serve {self.target} exited with "
                                   f"{self.proc.returncode}:\n{self.log_tail()}")
            if "Initializing service error" in self.log_tail(200_000):
                # BentoML keeps restarting a worker whose service fails to load: say why now
                self.stop()
                raise RuntimeError(f"bentoml serve {self.target}: the service failed to "
                                   f"load:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"bentoml serve {self.target} not ready after "
                           f"{self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    # -- the process tree -------------------------------------------------------------
    def processes(self) -> list[psutil.Process]:
        """Every live process of this server: `bentoml serve`, its descendants, and any
        process carrying this server's marker (a worker orphaned by a killed parent)."""
        found = dict(self._seen)
        if self.proc is not None:
            try:
                parent = psutil.Process(self.proc.pid)
                found.update({p.pid: p for p in [parent, *parent.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
            found.update({p.pid: p for p in self._marked()})
        self._seen = {pid: p for pid, p in found.items() if _alive(p)}
        return list(self._seen.values())

    def _marked(self) -> list[psutil.Process]:
        """Processes of this user, started since this server, whose environment carries
        its marker (only those: nothing else's environment is read)."""
        me, out = os.getuid(), []
        for p in psutil.process_iter(["uids", "create_time"]):
            try:
                created = p.info["create_time"] or 0.0  # None where it may not be read
                if p.info["uids"].real != me or created < self._started_at - 1:
                    continue
                if p.environ().get(MARKER_ENV) == self.marker:
                    out.append(p)
            except (psutil.Error, AttributeError):
                continue
        return out

    def stop(self) -> None:
        """Stop the whole tree: SIGTERM to `bentoml serve` (it stops its workers, which
        finish the requests in flight), or to each process when that parent is gone; SIGKILL
        whatever still runs after `stop_timeout` seconds."""
        atexit.unregister(self.stop)
        if self.proc is None:
            return
        procs = self.processes()
        others = [p for p in procs if p.pid != self.proc.pid]
        # Only the parent while it lives: a second SIGTERM straight to a worker would make
        # uvicorn exit at once, dropping the requests it is finishing.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        else:
            for p in others:
                _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        _, alive = psutil.wait_procs(others, timeout=max(0.1, deadline - time.monotonic()))
        for p in alive:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        self._seen = {}

    def __enter__(self) -> "BentoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:  # already gone
        pass
