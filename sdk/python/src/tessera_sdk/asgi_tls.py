"""The client certificate for ASGI apps served by uvicorn, which does not
provide the ASGI TLS extension (`scope["extensions"]["tls"]`) that
`tessera_sdk.server.ToolScopes` reads to check a bound token's `cnf`.

    uvicorn.Config(app, http=ClientCertificateH11Protocol,
                   ssl_certfile=..., ssl_keyfile=..., ssl_ca_certs=bundle,
                   ssl_cert_reqs=ssl.CERT_REQUIRED)

`ClientCertificateH11Protocol` is uvicorn's own HTTP/1.1 protocol with one
addition: every request of a TLS connection whose client presented a
certificate carries it as `client_cert_chain` (the leaf, PEM) in the TLS
extension. asyncio calls `connection_made` once the handshake is complete,
so the certificate is known before any request is read, and it is the one
whose key signed this connection's handshake (proof of possession, RFC 8705
§3). Needs uvicorn (it comes with the `mcp` package).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class ClientCertificateH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, reporting the client certificate in the ASGI TLS extension."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        app = self.config.loaded_app
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            self.app = app
            return
        tls = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": None,
            "cipher_suite": None,
        }

        async def with_client_certificate(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": tls}}
            await app(scope, receive, send)

        self.app = with_client_certificate
