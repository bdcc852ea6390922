"""The official MCP Python client, unmodified, over an httpx2 client that
carries the SDK's auth; every HTTP answer is recorded so a test can assert
what the server really said (the MCP client folds 4xx into a JSON-RPC error)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tessera_sdk.challenge import BearerChallenge


@dataclass
class Seen:
    """HTTP answers to MCP POSTs: (status, the Bearer challenge if any)."""

    answers: list[tuple[int, BearerChallenge | None]] = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [s for s, _ in self.answers]

    def clear(self) -> None:
        self.answers.clear()


@asynccontextmanager
async def mcp_client(
    url: str,
    auth: httpx2.Auth | None = None,
    headers: dict[str, str] | None = None,
    seen: Seen | None = None,
    verify: ssl.SSLContext | bool = True,
) -> AsyncIterator[tuple[Client, Seen]]:
    seen = seen if seen is not None else Seen()

    async def record(response: httpx2.Response) -> None:
        if response.request.method == "POST":
            seen.answers.append((response.status_code, BearerChallenge.parse(response.headers.get("www-authenticate"))))

    async with (
        httpx2.AsyncClient(
            auth=auth, headers=headers, event_hooks={"response": [record]}, timeout=30, verify=verify
        ) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client, seen


def text(result: object) -> str:
    """The text of a tool result."""
    content = getattr(result, "content", [])
    return " ".join(getattr(c, "text", "") for c in content)


async def refused_statuses(
    url: str,
    auth: httpx2.Auth | None = None,
    headers: dict[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> set[int]:
    """Connect an MCP client that the server must refuse; the HTTP statuses it got.
    Every refusal must carry an `invalid_token` Bearer challenge."""
    seen = Seen()
    try:
        async with mcp_client(url, auth, headers, seen, verify):
            pass
    except Exception:  # noqa: S110  connecting must fail; what the server said is in `seen`
        pass
    else:
        raise AssertionError("the MCP client connected")
    for status, challenge in seen.answers:
        assert status != 401 or (challenge is not None and challenge.error == "invalid_token"), seen.answers
    return set(seen.statuses)
