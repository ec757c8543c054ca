"""A real PostgreSQL server for tests: the binaries of the `pgserver` wheel, a temporary data
folder, a free port on 127.0.0.1, password authentication, stopped (and its folder removed)
afterwards.

pgserver's own `get_server()` listens on a Unix socket only and makes a system user when run as
root; the tests want TCP on loopback (what dagster-postgres and a real deployment use) and no
change to the machine, so this drives the same binaries directly: `initdb`, then `postgres`
in its own session, stopped by its own PID. As root, PostgreSQL refuses to start, so the server
runs as `nobody` (the data folder is handed to that user).

Import the fixture explicitly where it is needed (no conftest):

    from pg_server import postgres  # noqa: F401  (the session-scoped fixture)

    def test_x(postgres):
        url = postgres.create_database("x")      # postgresql+psycopg://…/x
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
USER = "bonmf"
RUN_AS_ROOT_USER = "nobody"   # PostgreSQL will not run as root


def _bin(name: str) -> str:
    """A binary of the pgserver wheel (found without importing pgserver, whose import warns
    about XDG_RUNTIME_DIR and sets up its own lock files)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None:
        raise RuntimeError("the PostgreSQL tests need the pgserver package: "
                           "pip install -e '.[test]'")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _run_as() -> dict:
    """subprocess arguments that drop root to an unprivileged user (nothing otherwise)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(RUN_AS_ROOT_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass
class PgServer:
    """A running server; `url()` gives SQLAlchemy URLs, `env()` libpq-style variables."""

    root: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    user: str = USER
    host: str = HOST
    process: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres", driver: str = "psycopg") -> str:
        return (f"postgresql+{driver}://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{database}")

    def env(self, database: str) -> dict[str, str]:
        """Connection settings as environment variables (what a dagster.yaml reads)."""
        return {"BONMF_PG_HOST": self.host, "BONMF_PG_PORT": str(self.port),
                "BONMF_PG_USER": self.user, "BONMF_PG_PASSWORD": self.password,
                "BONMF_PG_DB": database}

    def connect(self, database: str = "postgres", **kwargs):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user,
                               password=self.password, dbname=database, **kwargs)

    def create_database(self, name: str) -> str:
        """A new, empty database → its SQLAlchemy URL (psycopg 3)."""
        with self.connect(autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    # -- life cycle ---------------------------------------------------------------------------

    def initdb(self) -> None:
        run_as = _run_as()
        if run_as:
            os.chown(self.root, run_as["user"], run_as["group"])
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])
        try:
            subprocess.run([_bin("initdb"), "-D", str(self.data), "-U", self.user,
                            f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                            "--no-locale", "--no-sync"],
                           check=True, capture_output=True, text=True, timeout=120, **run_as)
        finally:
            pwfile.unlink()

    def start(self, attempts: int = 3) -> None:
        """Start on a free loopback port (another port if that one was taken meanwhile)."""
        for _ in range(attempts):
            self.port = _free_port()
            self.process = subprocess.Popen(
                # TCP on loopback only, no Unix socket; fsync off: test data, fast and disposable.
                [_bin("postgres"), "-D", str(self.data), "-h", self.host, "-p", str(self.port),
                 "-k", "", "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **_run_as())
            if self._wait_ready():
                return
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self.log.read_text()[-3000:]}")

    def _wait_ready(self, timeout: float = 60.0) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:       # exited: e.g. the port was taken
                return False
            try:
                self.connect(connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL to the server's process group if it hangs."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_server() -> PgServer:
    """initdb + start in a new temporary folder (the caller stops it and removes `root`)."""
    # Under /tmp itself: the unprivileged server user must be able to reach its folder.
    server = PgServer(Path(tempfile.mkdtemp(prefix="bonmf-pg-")))
    try:
        server.initdb()
        server.start()
    except BaseException:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the test session; stopped and deleted at its end."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
