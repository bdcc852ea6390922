"""Tessera per-task tokens for Python agents and MCP servers.

Agent side::

    from tessera_sdk import task

    async with task("summarise-42", resource="https://notes.example/mcp", scopes=["notes:read"]) as t:
        token = await t.token()

Off the node, over the agent's HTTPS face: `JwtSvidAssertion`, the assertion
provider of the MCP SDK's machine-to-machine provider
(`tessera_sdk.mcp.jwt_svid_client`).

Server side: `tessera_sdk.server.Verifier` (`Verifier.remote` on another host),
`tessera_sdk.server.ToolScopes` and, for the official MCP SDK,
`tessera_sdk.mcp.TesseraTokenVerifier`.
"""

from .assertion import JwtSvidAssertion
from .challenge import BearerChallenge
from .errors import (
    AccessDenied,
    ApprovalTimeout,
    AuthorizationPending,
    ConfigurationError,
    ExpiredToken,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    ServerError,
    SlowDown,
    StepUpRefused,
    TaskEnded,
    TemporarilyUnavailable,
    TesseraError,
    UnauthorizedClient,
    UnsupportedGrantType,
    UnsupportedTokenType,
    WorkloadApiError,
)
from .exchange import Exchange, IssuedToken, Target
from .task import Approval, Task, act_for, task

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "Approval",
    "ApprovalTimeout",
    "AuthorizationPending",
    "BearerChallenge",
    "ConfigurationError",
    "Exchange",
    "ExpiredToken",
    "InvalidClient",
    "InvalidRequest",
    "InvalidScope",
    "InvalidTarget",
    "IssuedToken",
    "JwtSvidAssertion",
    "OAuthError",
    "ServerError",
    "SlowDown",
    "StepUpRefused",
    "Target",
    "Task",
    "TaskEnded",
    "TemporarilyUnavailable",
    "TesseraError",
    "UnauthorizedClient",
    "UnsupportedGrantType",
    "UnsupportedTokenType",
    "WorkloadApiError",
    "__version__",
    "act_for",
    "task",
]
