"""JWT-SVIDs as client assertions, for OAuth clients that authenticate with
`private_key_jwt` (RFC 7523 §2.2) at Tessera's HTTPS token endpoint.

The official MCP Python SDK's machine-to-machine provider takes an
*assertion provider*, an async callable from the audience it wants (the
authorization server's issuer) to a signed JWT::

    from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider
    from tessera_sdk.assertion import JwtSvidAssertion

    provider = PrivateKeyJWTOAuthProvider(
        server_url="https://notes.example/mcp", storage=storage, client_id=MY_SPIFFE_ID,
        assertion_provider=JwtSvidAssertion(), scope="notes:read", issuer="https://tessera.example")

`JwtSvidAssertion` answers each call with a JWT-SVID for that audience from
the Workload API (found as everywhere in this SDK: the argument, else
`SPIFFE_ENDPOINT_SOCKET`). It is never a cached one: the token endpoint accepts
each assertion once, by its `jti` (RFC 7523 §3), so a second token request
(the first token expired, or a 401) needs a new SVID. The node agent mints one
afresh for every fetch whose audience is its own token service.
"""

from __future__ import annotations

import asyncio
import os

from .sockets import Sockets
from .workload import WorkloadApi


class JwtSvidAssertion:
    """An assertion provider: `await provider(audience)` is a new JWT-SVID for `audience`.

    - `workload_api`: the Workload API socket (default: `SPIFFE_ENDPOINT_SOCKET`).
    - `spiffe_id`: which of this process's identities to use (default: its first).
    """

    def __init__(self, *, workload_api: str | os.PathLike[str] | None = None, spiffe_id: str | None = None) -> None:
        self._socket = workload_api
        self._spiffe_id = spiffe_id
        self._api: WorkloadApi | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, audience: str) -> str:
        loop = asyncio.get_running_loop()
        if self._api is None or self._loop is not loop:
            # Found on first use, so a missing socket is reported where it
            # matters; a gRPC channel belongs to one event loop, so a provider
            # used again under another (a second asyncio.run) opens a new one.
            self._api = WorkloadApi(Sockets.find(workload_api=self._socket).workload_api)
            self._loop = loop
        svid = await self._api.jwt_svid(audience, self._spiffe_id, fresh=True)
        return svid.token

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None
