"""The node agent's token exchange (docs/exchange.md), over its Unix socket.

`Exchange` is the low-level client: one method per endpoint, OAuth errors
raised as the typed errors of `tessera_sdk.errors`. Most agents use the task
scope (`tessera_sdk.task`) instead, which calls it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2

from .errors import OAuthError, ServerError, TemporarilyUnavailable, oauth_error
from .sockets import Sockets
from .workload import WorkloadApi

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105  a URN, not a secret
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105


@dataclass(frozen=True)
class IssuedToken:
    """A token the exchange issued (RFC 8693 §2.2.1 response)."""

    access_token: str
    scopes: frozenset[str]
    expires_in: int
    task_id: str | None
    issued_at: float = field(default_factory=time.time)

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.expires_in

    def __repr__(self) -> str:  # never print the token itself
        return f"IssuedToken(scopes={sorted(self.scopes)}, expires_in={self.expires_in}, task_id={self.task_id!r})"


@dataclass(frozen=True)
class Target:
    """The one audience of a token: an RFC 8707 `resource` URI or a logical `audience`."""

    resource: str | None = None
    audience: str | None = None

    def __post_init__(self) -> None:
        if (self.resource is None) == (self.audience is None):
            raise ValueError("give exactly one of resource= (a URI, e.g. an MCP server's) or audience=")

    @property
    def value(self) -> str:
        return self.resource if self.resource is not None else str(self.audience)

    def form(self) -> dict[str, str]:
        return {"resource": self.resource} if self.resource is not None else {"audience": str(self.audience)}


class Exchange:
    """Client of the exchange socket. Use as `async with Exchange() as ex:` or call `aclose()`."""

    def __init__(
        self,
        workload_api: str | os.PathLike[str] | None = None,
        exchange_socket: str | os.PathLike[str] | None = None,
        *,
        spiffe_id: str | None = None,
    ) -> None:
        self.sockets = Sockets.find(workload_api, exchange_socket)
        self.spiffe_id = spiffe_id
        self._workload = WorkloadApi(self.sockets.workload_api)
        self._http = httpx2.AsyncClient(
            transport=httpx2.AsyncHTTPTransport(uds=str(self.sockets.exchange)),
            base_url="http://localhost",
            timeout=30,
        )
        self._metadata: dict[str, Any] | None = None

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._workload.aclose()

    async def _call(self, method: str, path: str, form: dict[str, str] | None = None) -> Any:
        try:
            if form is None:
                response = await self._http.request(method, path)
            else:
                response = await self._http.request(method, path, data=form)
        except httpx2.TransportError as e:
            raise TemporarilyUnavailable(
                f"cannot reach the exchange socket {self.sockets.exchange}: {e}", status=503
            ) from e
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            raise oauth_error(response.status_code, body)
        if not isinstance(body, dict):
            raise ServerError(f"{path} answered without a JSON object", status=response.status_code)
        return body

    async def metadata(self) -> dict[str, Any]:
        """The RFC 8414 metadata (cached for the life of this client)."""
        if self._metadata is None:
            self._metadata = await self._call("GET", "/.well-known/oauth-authorization-server")
        return self._metadata

    async def issuer(self) -> str:
        return str((await self.metadata())["issuer"])

    async def jwks(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/jwks")
        return result

    async def own_svid(self) -> str:
        """This process's JWT-SVID for the exchange (audience = the issuer)."""
        return (await self._workload.jwt_svid(await self.issuer(), self.spiffe_id)).token

    async def own_spiffe_id(self) -> str:
        return (await self._workload.jwt_svid(await self.issuer(), self.spiffe_id)).spiffe_id

    async def token(
        self,
        target: Target,
        scopes: Sequence[str],
        *,
        task_id: str | None = None,
        ttl: float | None = None,
        may_act: str | None = None,
        approval_id: str | None = None,
        on_behalf_of: str | None = None,
    ) -> IssuedToken:
        """One RFC 8693 exchange: this process's JWT-SVID (or, with `on_behalf_of`, a
        token it may act on as `subject_token` and its JWT-SVID as `actor_token`)
        for a token for `target` with `scopes`."""
        own = await self.own_svid()
        form: dict[str, str] = {"grant_type": TOKEN_EXCHANGE, "scope": " ".join(scopes), **target.form()}
        if on_behalf_of is None:
            form |= {"subject_token": own, "subject_token_type": JWT_TYPE}
        else:
            form |= {
                "subject_token": on_behalf_of,
                "subject_token_type": ACCESS_TOKEN_TYPE,
                "actor_token": own,
                "actor_token_type": JWT_TYPE,
            }
        if task_id is not None:
            form["task_id"] = task_id
        if ttl is not None:
            form["requested_ttl"] = str(max(1, int(ttl)))
        if may_act is not None:
            form["may_act"] = may_act
        if approval_id is not None:
            form["approval_id"] = approval_id
        issued_at = time.time()
        body = await self._call("POST", "/token", form)
        try:
            return IssuedToken(
                access_token=str(body["access_token"]),
                scopes=frozenset(str(body.get("scope", " ".join(scopes))).split()),
                expires_in=int(body["expires_in"]),
                task_id=body.get("task_id"),
                issued_at=issued_at,
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ServerError(f"/token answered 200 without a usable token response: {e}") from e

    async def end_task(self, task_id: str) -> None:
        """End a task of this workload: every token of it stops working now."""
        await self._call("POST", "/revoke", {"task_id": task_id})

    async def revoke(self, token: str) -> None:
        """Revoke one token (and every token delegated from it)."""
        await self._call("POST", "/revoke", {"token": token, "token_type_hint": "access_token"})

    async def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 introspection; a party of the token sees all its claims."""
        result: dict[str, Any] = await self._call("POST", "/introspect", {"token": token})
        return result


__all__ = ["Exchange", "IssuedToken", "OAuthError", "Target"]
