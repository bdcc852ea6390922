"""The official MCP Python SDK, unmodified, against Tessera's token service.

An MCP server built on the SDK (`MCPServer` with `AuthSettings`) publishes
Protected Resource Metadata naming Tessera's https issuer and accepts only
tokens that verify against the keys Tessera publishes (PyJWT's PyJWKClient on
the `jwks_uri` of Tessera's RFC 8414 metadata). An MCP client built on the
SDK's `PrivateKeyJWTOAuthProvider` discovers Tessera from the server's PRM,
fetches its metadata (validated by the SDK's `OAuthMetadata` schema), and
sends `client_credentials` with a client assertion from an assertion
provider that fetches a JWT-SVID over the Workload API with py-spiffe.

Run by ../agent.sh, which starts the agent and exports TESSERA_ISSUER,
TESSERA_CA, TESSERA_CLIENT_ID, MCP_PORT_PY and SPIFFE_ENDPOINT_SOCKET.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import jwt
import pytest
import uvicorn
from mcp import ClientSession
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from spiffe import WorkloadApiClient

ISSUER = os.environ["TESSERA_ISSUER"]
CA = os.environ["TESSERA_CA"]
CLIENT_ID = os.environ["TESSERA_CLIENT_ID"]
PORT = int(os.environ["MCP_PORT_PY"])
RESOURCE = f"http://127.0.0.1:{PORT}/mcp"


def tls() -> ssl.SSLContext:
    """Trust the trust domain's CA, which issued the HTTPS face's certificate."""
    return ssl.create_default_context(cafile=CA)


class TesseraJwks:
    """A token verifier from Tessera's published metadata and keys: ES256,
    `iss` = the issuer, `aud` = this MCP server. Nothing of Tessera's code."""

    def __init__(self) -> None:
        meta = httpx2.get(
            f"{ISSUER}/.well-known/oauth-authorization-server", verify=tls()
        ).json()
        assert meta["issuer"] == ISSUER
        self.jwks = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=tls())
        self.seen: list[dict[str, Any]] = []

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["ES256"],
                audience=RESOURCE,
                issuer=ISSUER,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        self.seen.append(claims)
        return AccessToken(
            token=token,
            client_id=claims["client_id"],
            scopes=claims["scope"].split(),
            expires_at=claims["exp"],
            resource=claims["aud"],
            subject=claims["sub"],
            claims=claims,
        )


class MemoryStorage:
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


audiences: list[str] = []


async def jwt_svid_assertion(audience: str) -> str:
    """The assertion provider: a JWT-SVID for the audience the SDK asks for
    (the authorization server's issuer), from the Workload API."""
    audiences.append(audience)
    with WorkloadApiClient() as workload_api:
        return workload_api.fetch_jwt_svid(audience={audience}).token


@pytest.fixture(scope="module")
def verifier() -> Iterator[TesseraJwks]:
    jwks = TesseraJwks()
    server = MCPServer(
        "notes",
        token_verifier=jwks,
        auth=AuthSettings(
            issuer_url=ISSUER,  # type: ignore[arg-type]
            resource_server_url=RESOURCE,  # type: ignore[arg-type]
            required_scopes=["notes:read"],
            validate_token_resource=True,
        ),
    )

    @server.tool()
    def whoami() -> str:
        token = get_access_token()
        assert token is not None
        return f"{token.subject} {' '.join(token.scopes)}"

    app = server.streamable_http_app()
    config = uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not http.started:
        assert time.monotonic() < deadline, "the MCP server did not start"
        time.sleep(0.05)
    yield jwks
    http.should_exit = True
    thread.join(timeout=10)


def test_the_servers_prm_names_the_https_issuer(verifier: TesseraJwks) -> None:
    prm = httpx2.get(
        f"http://127.0.0.1:{PORT}/.well-known/oauth-protected-resource/mcp"
    ).json()
    assert prm["authorization_servers"] == [ISSUER]


def test_private_key_jwt_with_a_jwt_svid_gets_a_token_the_server_accepts(
    verifier: TesseraJwks,
) -> None:
    async def run() -> str:
        provider = PrivateKeyJWTOAuthProvider(
            server_url=RESOURCE,
            storage=MemoryStorage(),
            client_id=CLIENT_ID,
            assertion_provider=jwt_svid_assertion,
            scope="notes:read",
            issuer=ISSUER,
        )
        async with (
            httpx2.AsyncClient(auth=provider, verify=tls(), timeout=30) as client,
            streamable_http_client(RESOURCE, http_client=client) as (
                read,
                write,
            ),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            result = await session.call_tool("whoami", {})
            assert not result.is_error, result
            text = result.content[0]
            assert text.type == "text"
            return text.text

    answer = asyncio.run(run())
    assert answer == f"{CLIENT_ID} notes:read"
    assert audiences == [ISSUER], "the SDK asks for a JWT-SVID for the issuer"
    claims = verifier.seen[-1]
    assert claims["client_id"] == CLIENT_ID
    assert claims["txn"] == claims["jti"], "no task named: the token is its own task"
    assert "cnf" not in claims


def test_a_replayed_assertion_is_refused_with_invalid_client(
    verifier: TesseraJwks,
) -> None:
    """What an attacker who copied an assertion off the wire gets."""
    with WorkloadApiClient() as workload_api:
        assertion = workload_api.fetch_jwt_svid(audience={ISSUER}).token
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        "resource": RESOURCE,
        "scope": "notes:read",
    }
    first = httpx2.post(f"{ISSUER}/token", data=form, verify=tls())
    assert first.status_code == 200, first.text
    again = httpx2.post(f"{ISSUER}/token", data=form, verify=tls())
    assert again.status_code == 401
    assert again.json()["error"] == "invalid_client"
