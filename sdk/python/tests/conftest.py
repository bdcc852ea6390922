"""A real Tessera agent for the SDK tests, and the notes MCP server of
examples/mcp/python (the official MCP Python SDK, with this SDK's verifier).

Needs the `tessera` binary: $TESSERA_BIN, or target/debug/tessera (built by
`cargo build -p tessera-agent`); without it the suite fails, it never skips.
The sub-agent of the delegation tests runs from a copy of this interpreter,
so the agent tells it apart by executable path (unix:path).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[1]
ROOT = SDK.parents[1]
EXAMPLES = ROOT / "examples" / "mcp" / "python"
RESOURCE = "https://notes.example/mcp"
AGENT_ID = "spiffe://example.org/sdk/agent"
SUB_AGENT_ID = "spiffe://example.org/sdk/sub-agent"
OTHER_ID = "spiffe://example.org/sdk/other"


def tessera_bin() -> Path:
    path = Path(os.environ.get("TESSERA_BIN", ROOT / "target" / "debug" / "tessera"))
    if not path.is_file():
        pytest.fail(f"{path} is missing: cargo build --locked -p tessera-agent (or set TESSERA_BIN)", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: object, what: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@dataclass
class Agent:
    dir: Path
    bin: Path
    workload_socket: Path
    exchange_socket: Path
    admin_socket: Path
    sub_agent_python: Path
    # A copy of the tessera binary: another workload (OTHER_ID), by its path.
    other_tessera: Path
    https_issuer: str
    # The trust domain's CA bundle (PEM), which issued the HTTPS face's certificate.
    ca: Path
    # An MCP server URL on loopback that policy lets AGENT_ID get notes:read
    # and notes:write bearer tokens for, over HTTPS too (test_remote.py).
    remote_resource: str
    remote_port: int
    log: Path

    def tessera(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin), *args], capture_output=True, text=True, timeout=30, check=False)

    def approve(self, approval_id: str) -> None:
        done = self.tessera("approvals", "approve", approval_id, "--admin-socket", str(self.admin_socket))
        assert done.returncode == 0, done.stderr

    def deny(self, approval_id: str) -> None:
        done = self.tessera("approvals", "deny", approval_id, "--admin-socket", str(self.admin_socket))
        assert done.returncode == 0, done.stderr

    def sub_agent_env(self) -> dict[str, str]:
        """Environment for the copied interpreter: this venv's packages and the SDK."""
        paths = [str(SDK / "src"), *[p for p in sys.path if p.endswith("site-packages")]]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def start_agent(dir: Path) -> tuple[Agent, subprocess.Popen[bytes]]:
    bin = tessera_bin()
    sub_agent_python = dir / "sub-agent-python"
    shutil.copy2(os.path.realpath(sys.executable), sub_agent_python)
    other_tessera = dir / "other-tessera"
    shutil.copy2(bin, other_tessera)
    https_port = free_port()
    remote_port = free_port()
    remote_resource = f"http://127.0.0.1:{remote_port}/mcp"
    (dir / "admin").mkdir(mode=0o700)
    uid = os.getuid()
    # The shared test policies, and one for a server whose port is only
    # known now: over HTTPS nothing is attested, the JWT-SVID names the
    # principal, and without a client certificate tokens are bearer tokens.
    policies = dir / "policies"
    shutil.copytree(SDK.parent / "testdata" / "policies", policies)
    (policies / "remote.cedar").write_text(
        f"""@id("agent-remote-read-write")
@max_ttl("300s")
@bearer
permit (
  principal == Tessera::Workload::"{AGENT_ID}",
  action in [Tessera::Action::"notes:read", Tessera::Action::"notes:write"],
  resource == Tessera::Audience::"{remote_resource}"
);
"""
    )
    config = dir / "agent.toml"
    config.write_text(
        f"""trust_domain = "example.org"
socket_path  = "{dir}/sock/agent.sock"
data_dir     = "{dir}/data"

[admin]
socket_path = "{dir}/admin/admin.sock"

[https]
listen = "127.0.0.1:{https_port}"
issuer = "https://localhost:{https_port}"

[[entries]]
spiffe_id = "{OTHER_ID}"
selectors = ["unix:uid:{uid}", "unix:path:{other_tessera}"]

[[entries]]
spiffe_id = "{SUB_AGENT_ID}"
selectors = ["unix:uid:{uid}", "unix:path:{sub_agent_python}"]

[[entries]]
spiffe_id = "{AGENT_ID}"
selectors = ["unix:uid:{uid}"]

[exchange]
policy_dir = "{policies}"
max_ttl = "5m"
approval_poll_interval = "1s"
"""
    )
    log = dir / "agent.log"
    process = subprocess.Popen(
        [str(bin), "run", "--config", str(config)], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    agent = Agent(
        dir=dir,
        bin=bin,
        workload_socket=dir / "sock" / "agent.sock",
        exchange_socket=dir / "sock" / "exchange.sock",
        admin_socket=dir / "admin" / "admin.sock",
        sub_agent_python=sub_agent_python,
        other_tessera=other_tessera,
        https_issuer=f"https://localhost:{https_port}",
        ca=dir / "certs" / "bundle.0.pem",
        remote_resource=remote_resource,
        remote_port=remote_port,
        log=log,
    )
    try:
        wait_for(lambda: agent.exchange_socket.exists() and agent.admin_socket.exists(), "the agent's sockets", process)
        fetched = agent.tessera(
            "api", "fetch", "x509", "--write", str(dir / "certs"), "--socket", str(agent.workload_socket)
        )
        if fetched.returncode != 0:
            raise RuntimeError(f"tessera api fetch x509: {fetched.stderr}")
    except Exception:
        process.kill()
        print(log.read_text(), file=sys.stderr)
        raise
    return agent, process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def agent() -> Iterator[Agent]:
    with tempfile.TemporaryDirectory(prefix="tessera-sdk-py.") as tmp:
        agent, process = start_agent(Path(tmp))
        os.environ["SPIFFE_ENDPOINT_SOCKET"] = f"unix://{agent.workload_socket}"
        try:
            yield agent
        finally:
            stop(process)
            if process.returncode not in (0, -signal.SIGTERM):
                print(agent.log.read_text(), file=sys.stderr)


@dataclass
class NotesServer:
    url: str
    log: Path


@pytest.fixture(scope="session")
def notes_server(agent: Agent) -> Iterator[NotesServer]:
    port = free_port()
    log = agent.dir / "notes-server.log"
    process = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "notes_server.py"),
            "--port",
            str(port),
            "--resource",
            RESOURCE,
            "--issuer-url",
            agent.https_issuer,
            "--introspection-cache",
            "0.5",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(SDK / "src")},
    )
    try:
        wait_for(lambda: b"listening on" in log.read_bytes(), "the notes server", process)
        yield NotesServer(url=f"http://127.0.0.1:{port}/mcp", log=log)
    finally:
        stop(process)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
