"""The official MCP Python SDK's auth seam (`mcp.server.auth`), served by Tessera.

    verifier = Verifier("https://notes.example/mcp")
    server = MCPServer("notes", token_verifier=TesseraTokenVerifier(verifier),
                       auth=auth_settings(resource="https://notes.example/mcp",
                                          issuer_url="https://localhost:8443"))
    app = ToolScopes(server.streamable_http_app(), verifier,
                     {"add_note": ["notes:write"]}, resource_metadata_url=...)

`TesseraTokenVerifier` is the SDK's `TokenVerifier`: it gives the SDK's
bearer middleware an `AccessToken` (client_id, scopes, expiry, resource,
subject and claims) for every token `Verifier` accepts.

Client side, off the node: `jwt_svid_client(...)` is the SDK's own
machine-to-machine provider (`PrivateKeyJWTOAuthProvider`: client_credentials
with a `private_key_jwt` client assertion) whose assertion is a new JWT-SVID
for every token request (`tessera_sdk.assertion.JwtSvidAssertion`).

Needs the `mcp` package (`pip install tessera-sdk[mcp]`).
"""

from __future__ import annotations

import logging
import os

from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
from mcp.client.auth.oauth2 import TokenStorage
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from .assertion import JwtSvidAssertion
from .server import CLIENT_CERTIFICATE, TokenRejected, Verifier

log = logging.getLogger("tessera_sdk.server")


class TesseraTokenVerifier:
    """`mcp.server.auth.provider.TokenVerifier` for Tessera task tokens."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            verified = await self.verifier.verify(token, client_certificate=CLIENT_CERTIFICATE.get())
        except TokenRejected as e:
            log.debug("bearer token rejected: %s", e.reason)
            return None
        return AccessToken(
            token=token,
            client_id=verified.client_id,
            scopes=sorted(verified.scopes),
            expires_at=verified.expires_at,
            resource=verified.audience,
            subject=verified.subject,
            claims=verified.claims,
        )


def auth_settings(*, resource: str, issuer_url: str, required_scopes: list[str] | None = None) -> AuthSettings:
    """`AuthSettings` for a server whose tokens Tessera issues: `resource` is the
    server's canonical URI (the tokens' `aud`), `issuer_url` the HTTPS issuer
    named in its protected-resource metadata. The verifier checks `aud` itself."""
    return AuthSettings(
        issuer_url=issuer_url,  # type: ignore[arg-type]  # pydantic parses the str
        resource_server_url=resource,  # type: ignore[arg-type]
        required_scopes=required_scopes,
        validate_token_resource=False,
    )


class MemoryTokenStorage:
    """The MCP SDK's `TokenStorage`, in this process's memory: tokens are short-lived
    and a new one costs one request, so there is nothing worth persisting."""

    def __init__(self) -> None:
        self._tokens: OAuthToken | None = None
        self._client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self._tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self._tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self._client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self._client = client_info


def jwt_svid_client(
    server_url: str,
    *,
    issuer: str,
    client_id: str,
    scope: str | None = None,
    storage: TokenStorage | None = None,
    workload_api: str | os.PathLike[str] | None = None,
    spiffe_id: str | None = None,
) -> PrivateKeyJWTOAuthProvider:
    """The MCP SDK's `PrivateKeyJWTOAuthProvider` (an `httpx2.Auth`) for the MCP
    server at `server_url`, getting tokens from the Tessera agent's HTTPS face at
    `issuer` (only that authorization server) with a new JWT-SVID as client
    assertion for each token request. `client_id`: this workload's SPIFFE ID."""
    return PrivateKeyJWTOAuthProvider(
        server_url=server_url,
        storage=storage if storage is not None else MemoryTokenStorage(),
        client_id=client_id,
        assertion_provider=JwtSvidAssertion(workload_api=workload_api, spiffe_id=spiffe_id),
        scope=scope,
        issuer=issuer,
    )
