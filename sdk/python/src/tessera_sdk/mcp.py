"""The official MCP Python SDK's auth seam (`mcp.server.auth`), served by Tessera.

    verifier = Verifier("https://notes.example/mcp")
    server = MCPServer("notes", token_verifier=TesseraTokenVerifier(verifier),
                       auth=auth_settings(resource="https://notes.example/mcp",
                                          issuer_url="https://localhost:8443"))
    app = ToolScopes(server.streamable_http_app(), verifier,
                     {"add_note": ["notes:write"]}, resource_metadata_url=...)

`TesseraTokenVerifier` is the SDK's `TokenVerifier`: it gives the SDK's
bearer middleware an `AccessToken` (client_id, scopes, expiry, resource,
subject and claims) for every token `Verifier` accepts. Needs the `mcp`
package (`pip install tessera-sdk[mcp]`).
"""

from __future__ import annotations

import logging

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

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
