"""The resource-server side: verify task tokens, require scopes per MCP tool.

`Verifier` checks a token as RFC 9068 and RFC 8705 say a resource server
must: ES256 signature by a key of the exchange's `/jwks`, `typ` `at+jwt`,
`iss`, `aud` (this server), `exp`/`nbf`/`iat`, and, when the token carries
`cnf`, the client certificate of the connection (a bound token without the
matching certificate is refused, RFC 8705 §3). Revocation (a task ended, a
token revoked) is seen through introspection at the exchange, cached for
`introspection_cache` seconds.

`ToolScopes` is an ASGI middleware in front of an MCP app: a `tools/call`
for a tool whose scopes the token lacks gets a real
`403 insufficient_scope` with `WWW-Authenticate: Bearer error=...,
scope="<what the tool needs>", resource_metadata=...` (RFC 6750 §3.1, the
MCP scope challenge), before the MCP SDK sees the request.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
import jwt

from .challenge import BearerChallenge
from .errors import ConfigurationError, TesseraError
from .sockets import Sockets, exchange_socket
from .workload import WorkloadApi

log = logging.getLogger("tessera_sdk.server")

# The client certificate (DER) of the connection being served, set by
# `ToolScopes` from the ASGI TLS extension, read by the MCP token verifier.
CLIENT_CERTIFICATE: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "tessera_client_certificate", default=None
)

_MAX_CACHED = 10_000
# An unknown `kid` fetches the keys again at most this often (a flood of
# tokens with made-up kids must not become a flood of fetches).
_JWKS_REFETCH_SECONDS = 10.0
# Keys are fetched again this often even when every kid is known, so a key
# the issuer retired stops verifying here.
_JWKS_REFRESH_SECONDS = 300.0


class X509SvidCredential:
    """This resource server's X509-SVID as TLS client certificate at introspection
    (RFC 8705 `tls_client_auth`): an HTTPS client presenting it, built again once
    the SVID is past half its life. The private key never touches the disk: it
    goes to OpenSSL through an anonymous in-memory file (memfd)."""

    def __init__(self, verify: ssl.SSLContext | bool, *, workload_api: str | os.PathLike[str] | None = None) -> None:
        self._verify = verify
        self._socket = workload_api
        self._api: WorkloadApi | None = None
        self._client: httpx2.AsyncClient | None = None
        self._renew_at = 0.0

    async def client(self) -> httpx2.AsyncClient:
        if self._client is not None and time.time() < self._renew_at:
            return self._client
        if self._api is None:
            self._api = WorkloadApi(Sockets.find(workload_api=self._socket).workload_api)
        try:
            svid = await self._api.x509_svid()
        except TesseraError as e:
            raise TokenRejected(f"no X509-SVID to authenticate for introspection: {e}") from e
        # A new context per SVID, trusting exactly what the verifier trusts
        # (the given CAs, or the system's), so the caller's context is never
        # changed and a renewed SVID replaces the old one whole.
        fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if isinstance(self._verify, ssl.SSLContext):
            fresh.check_hostname = self._verify.check_hostname
            fresh.verify_mode = self._verify.verify_mode
            for ca in self._verify.get_ca_certs(binary_form=True):
                fresh.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(ca))
        else:
            fresh.load_default_certs()
        pem = "".join(ssl.DER_cert_to_PEM_cert(c) for c in svid.chain)
        key = base64.encodebytes(svid.private_key).decode()
        pem += f"-----BEGIN PRIVATE KEY-----\n{key}-----END PRIVATE KEY-----\n"
        fd = os.memfd_create("tessera-svid", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem.encode())
            fresh.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if self._client is not None:
            await self._client.aclose()
        self._client = httpx2.AsyncClient(verify=fresh, timeout=10)
        self._renew_at = svid.issued_at + (svid.expires_at - svid.issued_at) / 2
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._api is not None:
            await self._api.aclose()
            self._api = None


@dataclass(frozen=True)
class _Endpoints:
    jwks: str
    introspection: str
    keys_refresh: float


class JwtSvidCredential:
    """A JWT-SVID for the issuer, proving this resource server at introspection
    (`Authorization: Bearer`, RFC 7662 §2.1). Introspection does not consume it,
    so it is reused until 30 s before its expiry."""

    def __init__(self, issuer: str, *, workload_api: str | os.PathLike[str] | None = None) -> None:
        self._issuer = issuer
        self._socket = workload_api
        self._api: WorkloadApi | None = None

    async def token(self) -> str:
        if self._api is None:
            self._api = WorkloadApi(Sockets.find(workload_api=self._socket).workload_api)
        try:
            return (await self._api.jwt_svid(self._issuer)).token
        except TesseraError as e:
            raise TokenRejected(f"no JWT-SVID to authenticate to {self._issuer} for introspection: {e}") from e

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None


class TokenRejected(TesseraError):
    """The token is not acceptable here; `reason` says why (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedToken:
    """A verified task token."""

    token: str = field(repr=False)
    subject: str
    client_id: str
    scopes: frozenset[str]
    audience: str
    expires_at: int
    task_id: str | None
    actor: str | None
    claims: dict[str, Any] = field(repr=False)


def certificate_thumbprint(der: bytes) -> str:
    """RFC 8705 `x5t#S256`: base64url(SHA-256(DER)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class Verifier:
    """Verifies task tokens for one audience (this server's resource URI).

    On the node (the default), keys, metadata and introspection come from the
    agent's exchange socket. On another host, `Verifier.remote(audience,
    issuer)` reaches the agent's HTTPS face instead.

    - `audience`: what tokens for this server carry in `aud`.
    - `issuer`: expected `iss` (default: the exchange's metadata).
    - `exchange_socket`: the agent's exchange socket (default:
      `TESSERA_EXCHANGE_SOCKET`, or `exchange.sock` beside
      `SPIFFE_ENDPOINT_SOCKET`); keys and introspection come from there.
    - `introspect`: ask the exchange whether the token is still active (a
      revoked token, an ended task); `False` verifies offline only, so a
      revoked token works until it expires.
    - `introspection_cache`: seconds an answer is reused (a revocation takes
      at most this long to be seen here).
    """

    def __init__(
        self,
        audience: str,
        *,
        issuer: str | None = None,
        exchange_socket_path: str | os.PathLike[str] | None = None,
        introspect: bool = True,
        introspection_cache: float = 5.0,
        leeway: float = 5.0,
    ) -> None:
        self._setup(audience, issuer, introspect, introspection_cache, leeway)
        socket = exchange_socket(exchange_socket_path)
        self._http = httpx2.AsyncClient(
            transport=httpx2.AsyncHTTPTransport(uds=str(socket)), base_url="http://localhost", timeout=10
        )
        self._endpoints = _Endpoints(jwks="/jwks", introspection="/introspect", keys_refresh=_JWKS_REFRESH_SECONDS)

    def _setup(
        self, audience: str, issuer: str | None, introspect: bool, introspection_cache: float, leeway: float
    ) -> None:
        self.audience = audience
        self._issuer = issuer
        self._introspect = introspect
        self._cache_seconds = introspection_cache
        self._leeway = leeway
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_fetched: float | None = None
        self._verified: dict[str, dict[str, Any]] = {}
        self._introspected: dict[str, tuple[bool, float]] = {}
        # Where the keys and introspection are (None: read from the metadata),
        # and what proves this server at introspection (None: the socket's
        # peer credentials do).
        self._endpoints = None
        self._metadata_url = "/.well-known/oauth-authorization-server"
        self._credential: JwtSvidCredential | None = None
        self._where = "the exchange"

    @classmethod
    def remote(
        cls,
        audience: str,
        issuer: str,
        *,
        ca: str | os.PathLike[str] | ssl.SSLContext | None = None,
        workload_api: str | os.PathLike[str] | None = None,
        introspect: bool = True,
        introspection_cache: float = 5.0,
        keys_refresh: float = _JWKS_REFRESH_SECONDS,
        leeway: float = 5.0,
        client_auth: Literal["jwt-svid", "x509-svid"] = "jwt-svid",
    ) -> Verifier:
        """A verifier for a server that cannot reach the agent's sockets (another
        host, another pod): everything comes from the agent's HTTPS face at `issuer`.

        - Keys: the `jwks_uri` of the issuer's RFC 8414 metadata
          (`https://host/.well-known/oauth-authorization-server[/path]`, whose `issuer`
          must be exactly `issuer`, RFC 8414 §3.3), cached, fetched again for
          an unknown `kid` (at most every 10 s) and every `keys_refresh` seconds
          (a retired key stops verifying). OpenID discovery is not used: its
          `jwks_uri` holds the JWT-SVID keys, not the access-token keys.
        - Revocation: the metadata's `introspection_endpoint` (RFC 7662), each
          answer cached for `introspection_cache` seconds. The agent answers
          only authenticated resource servers: with `client_auth="jwt-svid"`
          this server presents a JWT-SVID for audience `issuer`
          (`Authorization: Bearer`), with `"x509-svid"` its X509-SVID as TLS
          client certificate (RFC 8705), either from its own node's Workload
          API (`workload_api`, default `SPIFFE_ENDPOINT_SOCKET`).
        - `ca`: what to trust for the HTTPS face: a PEM bundle path (the trust
          domain's bundle when the face's certificate is issued by Tessera,
          `tessera api fetch x509 --write DIR` writes it), an `ssl.SSLContext`,
          or `None` for the system's trust store (a public certificate).
        """
        if not issuer.startswith("https://"):
            raise ConfigurationError(f"issuer = {issuer!r}: the agent's HTTPS face is an https:// URL")
        verifier = cls.__new__(cls)
        verifier._setup(audience, issuer, introspect, introspection_cache, leeway)
        if isinstance(ca, ssl.SSLContext):
            verify: ssl.SSLContext | bool = ca
        elif ca is not None:
            verify = ssl.create_default_context(cafile=os.fspath(ca))
        else:
            verify = True
        verifier._http = httpx2.AsyncClient(verify=verify, timeout=10)
        verifier._metadata_url = metadata_url(issuer)
        verifier._keys_refresh = keys_refresh
        verifier._where = issuer
        if introspect and client_auth == "x509-svid":
            verifier._mtls = X509SvidCredential(verify, workload_api=workload_api)
        elif introspect and client_auth == "jwt-svid":
            verifier._credential = JwtSvidCredential(issuer, workload_api=workload_api)
        elif introspect:
            raise ConfigurationError(f"client_auth = {client_auth!r}: use 'jwt-svid' or 'x509-svid'")
        return verifier

    _keys_refresh = _JWKS_REFRESH_SECONDS
    _endpoints: _Endpoints | None
    _mtls: X509SvidCredential | None = None

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._credential is not None:
            await self._credential.aclose()
        if self._mtls is not None:
            await self._mtls.aclose()

    async def _get(
        self,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        http: httpx2.AsyncClient | None = None,
    ) -> dict[str, Any]:
        http = http or self._http
        try:
            if form is None:
                response = await http.get(path)
            else:
                response = await http.post(path, data=form, headers=headers)
        except httpx2.TransportError as e:
            raise TokenRejected(f"cannot reach {self._where} to check the token: {e}") from e
        if response.status_code != 200:
            detail = ""
            if response.headers.get("content-type", "").startswith("application/json"):
                body = response.json()
                if isinstance(body, dict) and "error" in body:
                    detail = f" ({body.get('error')}: {body.get('error_description', '')})"
            raise TokenRejected(f"{self._where} answered {path} with HTTP {response.status_code}{detail}")
        body = response.json()
        if not isinstance(body, dict):
            raise TokenRejected(f"{self._where} answered {path} without a JSON object")
        return body

    async def _metadata(self) -> dict[str, Any]:
        meta = await self._get(self._metadata_url)
        issuer = meta.get("issuer")
        if self._issuer is not None and issuer != self._issuer:
            # RFC 8414 §3.3: metadata for another issuer is not this issuer's.
            raise TokenRejected(f"the metadata at {self._metadata_url} names issuer {issuer!r}, not {self._issuer!r}")
        if not isinstance(issuer, str):
            raise TokenRejected(f"the metadata at {self._metadata_url} names no issuer")
        self._issuer = issuer
        return meta

    async def _where_is(self) -> _Endpoints:
        if self._endpoints is None:
            meta = await self._metadata()
            jwks, introspection = meta.get("jwks_uri"), meta.get("introspection_endpoint")
            if not isinstance(jwks, str) or (self._introspect and not isinstance(introspection, str)):
                raise TokenRejected(f"the metadata of {self._issuer} has no jwks_uri or introspection_endpoint")
            self._endpoints = _Endpoints(jwks, str(introspection or ""), self._keys_refresh)
        return self._endpoints

    async def issuer(self) -> str:
        if self._issuer is None:
            await self._metadata()
        assert self._issuer is not None
        return self._issuer

    async def _key(self, kid: str) -> jwt.PyJWK:
        endpoints = await self._where_is()
        now = time.monotonic()
        key = self._keys.get(kid)
        stale = self._keys_fetched is None or now - self._keys_fetched > endpoints.keys_refresh
        unknown = key is None and (self._keys_fetched is None or now - self._keys_fetched > _JWKS_REFETCH_SECONDS)
        if stale or unknown:
            self._keys_fetched = now
            jwks = await self._get(endpoints.jwks)
            keys: dict[str, jwt.PyJWK] = {}
            for jwk in jwks.get("keys", []):
                if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str):
                    try:
                        keys[jwk["kid"]] = jwt.PyJWK(jwk)
                    except jwt.PyJWKError as e:
                        log.warning("ignoring an unusable key %s of %s: %s", jwk["kid"], self._where, e)
            self._keys = keys
            key = keys.get(kid)
        if key is None:
            raise TokenRejected(f"signed with an unknown key {kid!r}")
        return key

    async def _claims(self, token: str) -> dict[str, Any]:
        cached = self._verified.get(token)
        if cached is not None and cached["exp"] + self._leeway > time.time():
            return cached
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise TokenRejected(f"not a JWT: {e}") from e
        typ = str(header.get("typ", "")).lower()
        if typ not in ("at+jwt", "application/at+jwt"):
            raise TokenRejected(f"not an access token (typ {header.get('typ')!r}, RFC 9068 wants at+jwt)")
        if header.get("alg") != "ES256" or not isinstance(header.get("kid"), str):
            raise TokenRejected("only ES256 tokens with a kid are issued by Tessera")
        key = await self._key(header["kid"])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=["ES256"],
                audience=self.audience,
                issuer=await self.issuer(),
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
            )
        except jwt.InvalidTokenError as e:
            raise TokenRejected(f"invalid token: {e}") from e
        if len(self._verified) >= _MAX_CACHED:
            now = time.time()
            self._verified = {t: c for t, c in self._verified.items() if c["exp"] > now}
            if len(self._verified) >= _MAX_CACHED:
                self._verified.clear()
        self._verified[token] = claims
        return claims

    async def _active(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._introspected.get(digest)
        if cached is not None and now - cached[1] < self._cache_seconds:
            return cached[0]
        endpoints = await self._where_is()
        headers = None
        if self._credential is not None:
            headers = {"Authorization": f"Bearer {await self._credential.token()}"}
        http = await self._mtls.client() if self._mtls is not None else None
        active = (await self._get(endpoints.introspection, {"token": token}, headers, http)).get("active") is True
        if len(self._introspected) >= _MAX_CACHED:
            self._introspected = {d: v for d, v in self._introspected.items() if now - v[1] < self._cache_seconds}
            if len(self._introspected) >= _MAX_CACHED:
                self._introspected.clear()
        self._introspected[digest] = (active, now)
        return active

    async def verify(self, token: str, *, client_certificate: bytes | None = None) -> VerifiedToken:
        """The verified token, or `TokenRejected`. `client_certificate` is the DER
        certificate the client presented on this connection, if any."""
        claims = await self._claims(token)
        cnf = claims.get("cnf")
        if isinstance(cnf, dict) and "x5t#S256" in cnf:
            if client_certificate is None:
                raise TokenRejected(
                    "the token is bound to a client certificate (cnf) and the connection has none (RFC 8705 §3)"
                )
            if certificate_thumbprint(client_certificate) != cnf["x5t#S256"]:
                raise TokenRejected("the token is bound to another client certificate (cnf)")
        elif cnf is not None:
            raise TokenRejected("the token carries a cnf this server cannot check")
        if self._introspect and not await self._active(token):
            raise TokenRejected("token is not active (revoked, expired or its task has ended)")
        act = claims.get("act")
        return VerifiedToken(
            token=token,
            subject=str(claims["sub"]),
            client_id=str(claims.get("client_id", claims["sub"])),
            scopes=frozenset(str(claims.get("scope", "")).split()),
            audience=self.audience,
            expires_at=int(claims["exp"]),
            task_id=claims.get("txn") if isinstance(claims.get("txn"), str) else None,
            actor=str(act["sub"]) if isinstance(act, dict) and "sub" in act else None,
            claims=claims,
        )


def client_certificate(scope: Mapping[str, Any]) -> bytes | None:
    """The client's leaf certificate (DER) from the ASGI TLS extension, if the server
    terminates mTLS and reports it (`scope["extensions"]["tls"]["client_cert_chain"]`)."""
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain")
    if not chain:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(str(chain[0]))
    except ValueError:
        return None


def _bearer(scope: Mapping[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            text = bytes(value).decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    return None


def _tools_called(body: bytes) -> list[str] | None:
    """Names of the tools a JSON-RPC body calls; None if it is not JSON-RPC."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    messages = message if isinstance(message, list) else [message]
    names = []
    for m in messages:
        if isinstance(m, dict) and m.get("method") == "tools/call":
            params = m.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            names.append(name if isinstance(name, str) else "")
    return names


ASGIApp = Any  # (scope, receive, send) -> Awaitable[None]; kept loose to fit any framework


class ToolScopes:
    """ASGI middleware: `tools/call` needs the scopes listed for the tool.

    `tools` maps a tool name to the scopes it needs (all of them). Tools not
    listed need `other_tools` (default: nothing beyond the server-wide check of
    the MCP SDK). `resource_metadata_url` (RFC 9728) goes into every challenge.
    """

    def __init__(
        self,
        app: ASGIApp,
        verifier: Verifier,
        tools: Mapping[str, Sequence[str]],
        *,
        resource_metadata_url: str | None = None,
        other_tools: Sequence[str] = (),
        max_body_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.tools = {name: frozenset(scopes) for name, scopes in tools.items()}
        self.other_tools = frozenset(other_tools)
        self.resource_metadata_url = resource_metadata_url
        self.max_body_bytes = max_body_bytes

    def required(self, tool: str) -> frozenset[str]:
        return self.tools.get(tool, self.other_tools)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        certificate = client_certificate(scope)
        reset = CLIENT_CERTIFICATE.set(certificate)
        try:
            if scope.get("method") != "POST":
                await self.app(scope, receive, send)
                return
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._answer(send, 413, {"error": "request body too large"}, None)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            names = _tools_called(body) or []
            needed = frozenset().union(*(self.required(n) for n in names)) if names else frozenset()
            if needed and not await self._allowed(scope, send, needed, names, certificate):
                return

            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                result: dict[str, Any] = await receive()
                return result

            await self.app(scope, replay, send)
        finally:
            CLIENT_CERTIFICATE.reset(reset)

    async def _allowed(
        self, scope: dict[str, Any], send: Any, needed: frozenset[str], tools: list[str], certificate: bytes | None
    ) -> bool:
        token = _bearer(scope)
        if token is None:
            await self._challenge(send, 401, BearerChallenge(resource_metadata=self.resource_metadata_url))
            return False
        try:
            verified = await self.verifier.verify(token, client_certificate=certificate)
        except TokenRejected as e:
            log.debug("bearer token rejected: %s", e.reason)
            await self._challenge(
                send,
                401,
                BearerChallenge("invalid_token", _plain(e.reason), resource_metadata=self.resource_metadata_url),
            )
            return False
        missing = needed - verified.scopes
        if missing:
            log.debug(
                "insufficient scope: sub=%s jti=%s tools=%s missing=%s",
                verified.subject,
                verified.claims.get("jti"),
                ",".join(tools),
                " ".join(sorted(missing)),
            )
            await self._challenge(
                send,
                403,
                BearerChallenge(
                    "insufficient_scope",
                    f"tool {', '.join(sorted(set(tools)))} needs scope {' '.join(sorted(needed))}",
                    scope=needed,
                    resource_metadata=self.resource_metadata_url,
                ),
            )
            return False
        return True

    async def _challenge(self, send: Any, status: int, challenge: BearerChallenge) -> None:
        body = {"error": challenge.error, "error_description": challenge.error_description}
        if challenge.error is None:
            body = {"error": "invalid_token", "error_description": "a bearer token is required"}
        await self._answer(send, status, body, challenge.header())

    @staticmethod
    async def _answer(send: Any, status: int, body: dict[str, Any], www_authenticate: str | None) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if www_authenticate is not None:
            headers.append((b"www-authenticate", www_authenticate.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def metadata_url(issuer: str) -> str:
    """Where RFC 8414 §3.1 puts the metadata of `issuer`: the well-known path
    inserted between its host and its path."""
    from urllib.parse import urlsplit

    parts = urlsplit(issuer)
    return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path.rstrip('/')}"


def _plain(text: str) -> str:
    """RFC 6750 §3: error_description is printable ASCII without `"` and `\\`."""
    return "".join(c if 0x20 <= ord(c) <= 0x7E and c not in '"\\' else " " for c in text)


def resource_metadata_url(resource: str) -> str:
    """Where RFC 9728 puts the metadata of `resource`: `/.well-known/oauth-protected-resource`
    inserted before its path (what the MCP SDK serves for `resource_server_url`)."""
    from urllib.parse import urlsplit

    parts = urlsplit(resource)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{path}"
