"""An MCP client on the official MCP Python SDK, unmodified, that finds
Tessera through the MCP server's Protected Resource Metadata and gets its
token with the SDK's own machine-to-machine provider.

    python mcp_sdk_client.py --server http://127.0.0.1:8080/mcp --ca bundle.0.pem \\
        --issuer https://localhost:8443 --client-id spiffe://example.org/demo/notes-agent \\
        [--resource https://notes.example/mcp] STEP...

The SDK's `PrivateKeyJWTOAuthProvider` does all of the OAuth: on the
server's 401 it reads the PRM (RFC 9728) named in `WWW-Authenticate`,
fetches the authorization server metadata (RFC 8414) from the https issuer
the PRM names, and sends `client_credentials` with a client assertion
(RFC 7523, MCP SEP-1046). The one piece Tessera supplies is the assertion
provider: a JWT-SVID for the audience the SDK asks for (the issuer), fresh
from the Workload API ($SPIFFE_ENDPOINT_SOCKET). No task is named, so the
token is a task of its own. The SDK asks for the scope the server's 401
names, and on a 403 `insufficient_scope` for more (step-up); Tessera's
policies decide what it gets.

`--issuer` is the authorization server this client is registered with: the
SDK goes on only if the PRM leads to metadata with exactly that issuer.
`--resource` is the server's canonical URI (what its PRM says and what
tokens are issued for) when it is reached at another address, as the demo's
server is on loopback; by default it is `--server`.

Steps: a tool name (`list_notes`) or `tool:text` (`add_note:hello`). Prints
where the SDK found the authorization server, the token's issuer, subject
and scopes (never the token), and each tool's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from tessera_sdk.workload import WorkloadApi


class MemoryStorage:
    """The SDK's TokenStorage protocol, kept in memory for one run."""

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


def workload_api_socket() -> Path:
    endpoint = os.environ.get("SPIFFE_ENDPOINT_SOCKET", "")
    if not endpoint.startswith("unix://"):
        raise SystemExit("SPIFFE_ENDPOINT_SOCKET must be set to unix:///path/to/agent.sock")
    return Path(endpoint.removeprefix("unix://"))


async def jwt_svid_assertion(audience: str) -> str:
    """The assertion provider: a new JWT-SVID for `audience` (Tessera's token
    endpoint accepts each assertion once, so none is reused)."""
    workload_api = WorkloadApi(workload_api_socket())
    try:
        return (await workload_api.jwt_svid(audience)).token
    finally:
        await workload_api.aclose()


def claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, for display only (the MCP server verifies it)."""
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def show_token(storage: MemoryStorage, shown: str | None) -> str | None:
    """Prints the current token's issuer, subject and scope if it is new
    (the SDK replaced it); returns its `jti`."""
    if storage.tokens is None:
        return shown
    c = claims(storage.tokens.access_token)
    if c.get("jti") != shown:
        print(f"token from {c.get('iss')} for {c.get('sub')}: scope {c.get('scope')!r}, aud {c.get('aud')}")
    jti: str | None = c.get("jti")
    return jti


async def run(args: argparse.Namespace) -> None:
    storage = MemoryStorage()
    provider = PrivateKeyJWTOAuthProvider(
        server_url=args.resource or args.server,
        storage=storage,
        client_id=args.client_id,
        assertion_provider=jwt_svid_assertion,
        issuer=args.issuer,
    )
    # The HTTPS face's certificate is issued by the trust domain's CA.
    tls = ssl.create_default_context(cafile=args.ca)
    async with (
        httpx2.AsyncClient(auth=provider, verify=tls, timeout=30) as client,
        streamable_http_client(args.server, http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        prm = provider.context.protected_resource_metadata
        print(f"authorization server (from the server's PRM): {provider.context.auth_server_url}")
        print(f"  resource: {prm.resource if prm else '?'}")
        meta = provider.context.oauth_metadata
        print(f"  token endpoint (RFC 8414 metadata): {meta.token_endpoint if meta else '?'}")
        shown = show_token(storage, None)
        for step in args.steps:
            tool, _, text = step.partition(":")
            arguments = {"text": text} if text else {}
            result = await session.call_tool(tool, arguments)
            content = result.content[0] if result.content else None
            answer = content.text if content is not None and content.type == "text" else repr(result)
            if result.is_error:
                raise SystemExit(f"{tool}: error: {answer}")
            print(f"{tool}: {answer}")
            shown = show_token(storage, shown)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--server", required=True, help="the MCP server's URL")
    parser.add_argument("--resource", help="the server's canonical URI, if not --server")
    parser.add_argument("--issuer", required=True, help="the https issuer this client is registered with")
    parser.add_argument("--client-id", required=True, help="this workload's SPIFFE ID")
    parser.add_argument("--ca", required=True, help="PEM bundle that issued the HTTPS face's certificate")
    parser.add_argument("steps", nargs="*")
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
