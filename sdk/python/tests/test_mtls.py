"""`cnf` end to end in Python: the official MCP Python SDK's server on uvicorn
over mTLS (`ClientCertificateH11Protocol` reports the client certificate),
this SDK's verifier behind `ToolScopes`, and the official MCP client on
httpx2 presenting an X509-SVID. A token bound to the agent's certificate
(`cnf` `x5t#S256`) works with that certificate; the same token over another
workload's valid X509-SVID is refused."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import uvicorn
from conftest import AGENT_ID, OTHER_ID, RESOURCE, Agent, free_port
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp_helpers import mcp_client, refused_statuses, text

from tessera_sdk import task
from tessera_sdk.asgi_tls import ClientCertificateH11Protocol
from tessera_sdk.mcp import TesseraTokenVerifier, auth_settings
from tessera_sdk.server import TokenRejected, ToolScopes, Verifier, certificate_thumbprint, resource_metadata_url

pytestmark = pytest.mark.anyio


@dataclass
class Svid:
    cert: Path
    key: Path
    bundle: Path

    def der(self) -> bytes:
        return x509.load_pem_x509_certificates(self.cert.read_bytes())[0].public_bytes(Encoding.DER)

    def client_tls(self) -> ssl.SSLContext:
        """Present this X509-SVID; trust the server's chain to the trust bundle.
        An SVID names a SPIFFE ID, not a DNS name, so the host name is not
        checked (the URI SAN would be, by a SPIFFE-aware client)."""
        context = ssl.create_default_context(cafile=str(self.bundle))
        context.check_hostname = False
        context.load_cert_chain(self.cert, self.key)
        return context


def svid_of(agent: Agent, bin: Path, spiffe_id: str, dir: Path) -> Svid:
    """The X509-SVID that the process `bin` gets for `spiffe_id` (written by the CLI)."""
    done = subprocess.run(
        [str(bin), "api", "fetch", "x509", "--write", str(dir), "--socket", str(agent.workload_socket)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for cert in sorted(dir.glob("svid.*.pem")):
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if spiffe_id in uris.get_values_for_type(x509.UniformResourceIdentifier):
            n = cert.name.split(".")[1]
            return Svid(cert, dir / f"svid.{n}.key", dir / f"bundle.{n}.pem")
    raise AssertionError(f"{bin} got no X509-SVID for {spiffe_id}")


@dataclass
class MtlsServer:
    url: str
    mine: Svid
    other: Svid


@pytest.fixture(scope="module")
def mtls_server(agent: Agent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsServer]:
    mine = svid_of(agent, agent.bin, AGENT_ID, tmp_path_factory.mktemp("mine"))
    other = svid_of(agent, agent.other_tessera, OTHER_ID, tmp_path_factory.mktemp("other"))
    verifier = Verifier(RESOURCE, introspection_cache=0.5)
    server = MCPServer(
        "notes-mtls",
        token_verifier=TesseraTokenVerifier(verifier),
        auth=auth_settings(resource=RESOURCE, issuer_url=agent.https_issuer),
    )

    @server.tool()
    def whoami() -> str:
        token = get_access_token()
        assert token is not None
        return f"{token.subject} task {(token.claims or {}).get('txn')}"

    app = ToolScopes(
        server.streamable_http_app(),
        verifier,
        {"whoami": ["notes:bound"]},
        resource_metadata_url=resource_metadata_url(RESOURCE),
    )
    port = free_port()
    # The server's own X509-SVID serves TLS; clients must present one of the
    # trust domain.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=ClientCertificateH11Protocol,
        ssl_certfile=mine.cert,
        ssl_keyfile=mine.key,
        ssl_ca_certs=str(mine.bundle),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the MCP server did not start"
        time.sleep(0.05)
    yield MtlsServer(url=f"https://127.0.0.1:{port}/mcp", mine=mine, other=other)
    http.should_exit = True
    thread.join(timeout=10)


async def test_a_bound_token_works_with_its_certificate_and_not_with_another_workloads(
    mtls_server: MtlsServer,
) -> None:
    async with task("py-mtls", resource=RESOURCE, scopes=["notes:bound"]) as t:
        token = await t.token()
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["cnf"] == {"x5t#S256": certificate_thumbprint(mtls_server.mine.der())}
        async with mcp_client(mtls_server.url, t.auth(), verify=mtls_server.mine.client_tls()) as (client, seen):
            assert text(await client.call_tool("whoami", {})) == f"{AGENT_ID} task py-mtls"
        assert all(status < 400 for status in seen.statuses), seen.answers
        # The same token, stolen by another workload of the trust domain and
        # sent over a connection with that workload's own valid X509-SVID.
        stolen = await refused_statuses(
            mtls_server.url,
            headers={"Authorization": f"Bearer {token}"},
            verify=mtls_server.other.client_tls(),
        )
        assert stolen == {401}
        # Why, from the verifier itself.
        verifier = Verifier(RESOURCE)
        try:
            assert (await verifier.verify(token, client_certificate=mtls_server.mine.der())).task_id == "py-mtls"
            with pytest.raises(TokenRejected, match="another client certificate"):
                await verifier.verify(token, client_certificate=mtls_server.other.der())
        finally:
            await verifier.aclose()
