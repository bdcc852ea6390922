"""Off the node, over the agent's HTTPS face: the official MCP Python SDK's
machine-to-machine provider (`PrivateKeyJWTOAuthProvider`, unmodified) with
this SDK's `JwtSvidAssertion`, and an MCP server (the SDK's `MCPServer`)
whose `Verifier.remote` knows only the issuer URL and the CA: keys from the
RFC 8414 metadata's `jwks_uri`, revocation from its introspection endpoint.
The access tokens are also judged by PyJWT's `PyJWKClient`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
import jwt
import pytest
import uvicorn
from conftest import AGENT_ID, SDK, Agent
from cryptography.hazmat.primitives.asymmetric import ec
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp_helpers import mcp_client, refused_statuses, text

from tessera_sdk import task
from tessera_sdk.assertion import JwtSvidAssertion
from tessera_sdk.mcp import TesseraTokenVerifier, auth_settings
from tessera_sdk.server import TokenRejected, ToolScopes, Verifier, resource_metadata_url

pytestmark = pytest.mark.anyio

CACHE_SECONDS = 1.0


def claims_of(token: str) -> dict[str, Any]:
    """The unverified payload (what the agent signed is checked elsewhere)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


class MemoryStorage:
    """The MCP SDK's `TokenStorage`, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


class RecordingAssertion(JwtSvidAssertion):
    """The packaged provider, remembering what the MCP SDK asked and got."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, audience: str) -> str:
        token = await super().__call__(audience)
        self.calls.append((audience, token))
        return token


@dataclass
class RemoteServer:
    url: str


@asynccontextmanager
async def remote_verifier(
    agent: Agent,
    resource: str,
    introspection_cache: float = CACHE_SECONDS,
    client_auth: Literal["jwt-svid", "x509-svid"] = "jwt-svid",
) -> AsyncIterator[Verifier]:
    """A verifier of the test's own (the server's runs in uvicorn's event loop)."""
    verifier = Verifier.remote(
        resource, agent.https_issuer, ca=agent.ca, introspection_cache=introspection_cache, client_auth=client_auth
    )
    try:
        yield verifier
    finally:
        await verifier.aclose()


@pytest.fixture(scope="module")
def remote_server(agent: Agent) -> Iterator[RemoteServer]:
    """The MCP server on another host, as far as it can tell: it is given the
    issuer URL and the CA, and never touches the agent's exchange socket."""
    resource = agent.remote_resource
    verifier = Verifier.remote(resource, agent.https_issuer, ca=agent.ca, introspection_cache=CACHE_SECONDS)
    server = MCPServer(
        "notes-remote",
        token_verifier=TesseraTokenVerifier(verifier),
        auth=auth_settings(resource=resource, issuer_url=agent.https_issuer, required_scopes=["notes:read"]),
    )

    @server.tool()
    def whoami() -> str:
        token = get_access_token()
        assert token is not None
        return f"{token.subject} {' '.join(token.scopes)} {(token.claims or {}).get('jti')}"

    @server.tool()
    def add_note(text: str) -> str:
        return f"added {text}"

    app = ToolScopes(
        server.streamable_http_app(),
        verifier,
        {"whoami": ["notes:read"], "add_note": ["notes:write"]},
        resource_metadata_url=resource_metadata_url(resource),
    )
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=agent.remote_port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the MCP server did not start"
        time.sleep(0.05)
    yield RemoteServer(url=resource)
    http.should_exit = True
    thread.join(timeout=10)


def trust(agent: Agent) -> ssl.SSLContext:
    """Trust the trust domain's CA, which issued the HTTPS face's certificate."""
    return ssl.create_default_context(cafile=str(agent.ca))


def published_keys_verify(agent: Agent, token: str, audience: str) -> dict[str, Any]:
    """PyJWT's own JWKS client on the metadata's jwks_uri."""
    tls = trust(agent)
    meta = httpx2.get(f"{agent.https_issuer}/.well-known/oauth-authorization-server", verify=tls).json()
    key = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=tls).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["ES256"], audience=audience, issuer=agent.https_issuer
    )
    return claims


async def test_the_m2m_provider_gets_a_token_with_a_jwt_svid_assertion_and_a_second_with_a_fresh_one(
    agent: Agent, remote_server: RemoteServer
) -> None:
    assertion = RecordingAssertion()
    answers = []
    try:
        for _ in range(2):
            # Two clients, each its own token request: the second needs a new
            # assertion, since the token endpoint accepts each jti once.
            provider = PrivateKeyJWTOAuthProvider(
                server_url=remote_server.url,
                storage=MemoryStorage(),
                client_id=AGENT_ID,
                assertion_provider=assertion,
                scope="notes:read",
                issuer=agent.https_issuer,
            )
            async with mcp_client(remote_server.url, provider, verify=trust(agent)) as (client, seen):
                answers.append(text(await client.call_tool("whoami", {})))
                assert 401 in seen.statuses, "the first request had no token: the provider fetched one"
    finally:
        await assertion.aclose()
    assert len(assertion.calls) == 2, assertion.calls
    audiences = {a for a, _ in assertion.calls}
    assert {a.rstrip("/") for a in audiences} == {agent.https_issuer}, "the SDK asks for the issuer"
    first, second = (claims_of(t) for _, t in assertion.calls)
    assert first["sub"] == second["sub"] == AGENT_ID
    assert first["jti"] != second["jti"], "each token request carried a new assertion"
    subjects, scopes, jtis = zip(*(a.split(" ") for a in answers), strict=True)
    assert subjects == (AGENT_ID, AGENT_ID) and scopes == ("notes:read", "notes:read")
    assert jtis[0] != jtis[1], "two tokens"


async def test_the_official_provider_steps_up_on_403_with_another_fresh_assertion(
    agent: Agent, remote_server: RemoteServer
) -> None:
    assertion = JwtSvidAssertion()
    storage = MemoryStorage()
    provider = PrivateKeyJWTOAuthProvider(
        server_url=remote_server.url,
        storage=storage,
        client_id=AGENT_ID,
        assertion_provider=assertion,
        scope="notes:read",
        issuer=agent.https_issuer,
    )
    try:
        async with mcp_client(remote_server.url, provider, verify=trust(agent)) as (client, seen):
            await client.call_tool("whoami", {})
            assert storage.tokens is not None
            first = published_keys_verify(agent, storage.tokens.access_token, remote_server.url)
            assert first["client_id"] == AGENT_ID and first["scope"] == "notes:read"
            # Outside the token's scopes: a real 403 from the remote verifier's
            # per-tool check, naming what the tool needs; the SDK's provider
            # steps up with another token request (a third fresh assertion),
            # which policy permits.
            seen.clear()
            assert text(await client.call_tool("add_note", {"text": "x"})) == "added x"
            assert seen.answers[0][0] == 403, seen.answers
            challenge = seen.answers[0][1]
            assert challenge is not None and challenge.error == "insufficient_scope"
            assert challenge.scope == frozenset({"notes:write"})
            assert seen.answers[-1][0] == 200, seen.answers
    finally:
        await assertion.aclose()
    assert storage.tokens is not None
    stepped_up = published_keys_verify(agent, storage.tokens.access_token, remote_server.url)
    assert stepped_up["scope"] == "notes:read notes:write" and stepped_up["jti"] != first["jti"]


async def test_an_ended_tasks_token_is_refused_remotely_within_the_cache_window(
    agent: Agent, remote_server: RemoteServer
) -> None:
    async with task("py-remote", resource=remote_server.url, scopes=["notes:read"]) as t:
        token = await t.token()
        async with mcp_client(remote_server.url, headers={"Authorization": f"Bearer {token}"}) as (client, _):
            assert text(await client.call_tool("whoami", {})).startswith(AGENT_ID)
        async with remote_verifier(agent, remote_server.url) as verifier:
            assert (await verifier.verify(token)).task_id == "py-remote"
    # The task has ended: once the cached introspection answer is older than
    # the window, the remote server refuses the token.
    await asyncio.sleep(CACHE_SECONDS)
    assert await refused_statuses(remote_server.url, headers={"Authorization": f"Bearer {token}"}) == {401}
    async with remote_verifier(agent, remote_server.url, introspection_cache=0) as verifier:
        with pytest.raises(TokenRejected, match="not active"):
            await verifier.verify(token)


async def test_introspection_authenticated_by_the_servers_x509_svid_sees_an_ended_task(
    agent: Agent, remote_server: RemoteServer
) -> None:
    """RFC 8705 tls_client_auth at the introspection endpoint: the verifier's
    X509-SVID (from the Workload API, key kept in memory) is its credential."""
    async with remote_verifier(agent, remote_server.url, client_auth="x509-svid") as verifier:
        async with task("py-remote-mtls", resource=remote_server.url, scopes=["notes:read"]) as t:
            token = await t.token()
            assert (await verifier.verify(token)).task_id == "py-remote-mtls"
        await asyncio.sleep(CACHE_SECONDS)
        with pytest.raises(TokenRejected, match="not active"):
            await verifier.verify(token)


async def test_a_revoked_token_is_refused_remotely(agent: Agent, remote_server: RemoteServer) -> None:
    async with (
        task("py-remote-revoked", resource=remote_server.url, scopes=["notes:read"]) as t,
        remote_verifier(agent, remote_server.url) as verifier,
    ):
        token = await t.token()
        await verifier.verify(token)
        # Revoked by its holder over the exchange socket (RFC 7009).
        done = agent.tessera("token", "revoke", "--token", token, "--exchange-socket", str(agent.exchange_socket))
        assert done.returncode == 0, done.stderr
        await asyncio.sleep(CACHE_SECONDS)
        with pytest.raises(TokenRejected, match="not active"):
            await verifier.verify(token)
        # The MCP server's own verifier too.
        assert await refused_statuses(remote_server.url, headers={"Authorization": f"Bearer {token}"}) == {401}


async def test_what_the_remote_verifier_refuses(agent: Agent, remote_server: RemoteServer) -> None:
    # A token signed by a key the issuer never published (kid unknown even
    # after fetching the keys again).
    forged = jwt.encode(
        {"iss": agent.https_issuer, "aud": remote_server.url, "sub": AGENT_ID, "exp": int(time.time()) + 60},
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": "not-a-published-key", "typ": "at+jwt"},
    )
    async with remote_verifier(agent, remote_server.url) as verifier:
        with pytest.raises(TokenRejected, match="unknown key"):
            await verifier.verify(forged)
    # Metadata naming another issuer than the one configured (RFC 8414 §3.3):
    # the same URL but for the trailing slash is another issuer.
    wrong = Verifier.remote(remote_server.url, agent.https_issuer + "/", ca=agent.ca)
    try:
        with pytest.raises(TokenRejected, match="names issuer"):
            await wrong.verify(forged)
    finally:
        await wrong.aclose()
    # A face it cannot authenticate (the system trust store does not know
    # the trust domain's CA).
    untrusted = Verifier.remote(remote_server.url, agent.https_issuer)
    try:
        with pytest.raises(TokenRejected, match="cannot reach"):
            await untrusted.verify(forged)
    finally:
        await untrusted.aclose()


def test_the_readmes_off_the_node_client_runs_as_written(agent: Agent, remote_server: RemoteServer) -> None:
    """README.md's client block, with the test agent's issuer and MCP server
    in place of the example's, and the trust domain's CA as the trust store."""
    section = (SDK / "README.md").read_text().split("## Off the node", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the section lost its client"
    code = found.group(1)
    for example, real in [
        ('"http://127.0.0.1:8080/mcp"', repr(remote_server.url)),
        ('"https://localhost:8443"', repr(agent.https_issuer)),
    ]:
        assert example in code, example
        code = code.replace(example, real)
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SDK / "src"), "SSL_CERT_FILE": str(agent.ca)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(rf"{re.escape(AGENT_ID)} notes:read \S+\n", run.stdout), run.stdout


def test_the_assertion_provider_works_under_a_second_event_loop(agent: Agent) -> None:
    """A script that runs asyncio.run twice with one provider (its gRPC channel
    belongs to the first loop, closed by then)."""
    assertion = JwtSvidAssertion()
    first = asyncio.run(assertion(agent.https_issuer))
    second = asyncio.run(assertion(agent.https_issuer))
    assert claims_of(first)["jti"] != claims_of(second)["jti"]
