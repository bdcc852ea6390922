"""Typed errors: one class per OAuth error code the exchange answers with.

The exchange speaks RFC 6749 §5.2 errors (`{"error", "error_description"}`),
with RFC 8693, RFC 7009 and RFC 8628 codes. Each code is its own class, so an
agent catches exactly what it can handle::

    try:
        async with task("t1", audience="demo", scopes=["demo:write"]) as t:
            ...
    except AccessDenied:      # policy or an operator said no
        ...
    except InvalidScope as e: # some scope refused; e.description says which
        ...
"""

from __future__ import annotations

from typing import Any, ClassVar


class TesseraError(Exception):
    """Base class of every error this package raises."""


class ConfigurationError(TesseraError):
    """The SDK cannot find or use the agent's sockets (e.g. SPIFFE_ENDPOINT_SOCKET unset)."""


class WorkloadApiError(TesseraError):
    """The Workload API refused or failed to give this process a JWT-SVID."""


class TaskEnded(TesseraError):
    """The task scope has been left: its tokens are revoked and no new ones are issued."""


class ApprovalTimeout(TesseraError):
    """No operator decided within the `approval_timeout` given to the task."""

    def __init__(self, approval_id: str, waited: float) -> None:
        super().__init__(f"approval {approval_id} was not decided within {waited:.0f}s")
        self.approval_id = approval_id


class StepUpRefused(TesseraError):
    """A resource server asked for scopes the task may not hold (`may_hold`)."""

    def __init__(self, needed: frozenset[str], may_hold: frozenset[str]) -> None:
        missing = " ".join(sorted(needed - may_hold))
        super().__init__(f"the server asks for scopes this task may not hold: {missing}")
        self.needed = needed
        self.may_hold = may_hold


class OAuthError(TesseraError):
    """An OAuth error answer from the exchange.

    `code` is the RFC `error` value, `description` its `error_description`,
    `status` the HTTP status, `extra` any further members of the body.
    """

    code: ClassVar[str] = ""

    def __init__(
        self,
        description: str,
        *,
        status: int = 400,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.error = code or self.code
        self.description = description
        self.status = status
        self.extra: dict[str, Any] = extra or {}
        super().__init__(f"{self.error}: {description}" if description else self.error)


class InvalidRequest(OAuthError):
    """Malformed request, an unacceptable subject/actor token, an ended task, an unknown approval."""

    code = "invalid_request"


class InvalidTarget(OAuthError):
    """No audience or resource, more than one, or (delegating) another audience than the parent's."""

    code = "invalid_target"


class InvalidScope(OAuthError):
    """A scope is malformed, refused by policy (exact mode) or wider than the parent token's."""

    code = "invalid_scope"


class AccessDenied(OAuthError):
    """Policy permits none of the scopes, delegation is too deep, or an operator denied the approval."""

    code = "access_denied"


class AuthorizationPending(OAuthError):
    """An operator must approve first; `approval_id` and `interval` say what to poll and how often."""

    code = "authorization_pending"

    @property
    def approval_id(self) -> str:
        return str(self.extra.get("approval_id", ""))

    @property
    def interval(self) -> float:
        value = self.extra.get("interval", 2)
        return float(value) if isinstance(value, (int, float)) else 2.0


class ExpiredToken(OAuthError):
    """The approval was not decided, or not redeemed, in time."""

    code = "expired_token"


class UnsupportedGrantType(OAuthError):
    code = "unsupported_grant_type"


class UnsupportedTokenType(OAuthError):
    code = "unsupported_token_type"


class UnauthorizedClient(OAuthError):
    """The caller may not revoke this token or task."""

    code = "unauthorized_client"


class InvalidClient(OAuthError):
    """The calling process could not be attested, or holds no identity."""

    code = "invalid_client"


class TemporarilyUnavailable(OAuthError):
    """The agent cannot decide now (e.g. its audit log cannot be written); retry later."""

    code = "temporarily_unavailable"


class SlowDown(OAuthError):
    """The calling process exceeded its request budget."""

    code = "slow_down"


class ServerError(OAuthError):
    code = "server_error"


_BY_CODE: dict[str, type[OAuthError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidTarget,
        InvalidScope,
        AccessDenied,
        AuthorizationPending,
        ExpiredToken,
        UnsupportedGrantType,
        UnsupportedTokenType,
        UnauthorizedClient,
        InvalidClient,
        TemporarilyUnavailable,
        SlowDown,
        ServerError,
    )
}


def oauth_error(status: int, body: object) -> OAuthError:
    """The typed error for an error answer (`body` is its parsed JSON, if any)."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code = str(body["error"])
        description = str(body.get("error_description", ""))
        extra = {k: v for k, v in body.items() if k not in ("error", "error_description")}
        cls = _BY_CODE.get(code, OAuthError)
        return cls(description, status=status, code=code, extra=extra)
    return ServerError(f"HTTP {status} without an OAuth error body", status=status)
