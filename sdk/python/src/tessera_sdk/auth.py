"""`httpx2.Auth` for MCP clients: a task's token on every request.

The official MCP Python SDK's HTTP transports take an `httpx2.AsyncClient`;
give it `auth=t.auth()`:

- every request carries the task's current token (renewed before expiry);
- `401`: the token was refused (expired, revoked, rotated keys): exchange a
  new one and retry once. After the task has ended there is nothing to
  exchange, and the 401 is returned as it is;
- `403` with `error="insufficient_scope"` and a `scope` (RFC 6750 §3.1, the
  MCP scope challenge): if the task may hold those scopes (`may_hold`), step
  up (a token with the task's scopes plus those) and retry once; otherwise
  return the 403 and record the challenge in `last_challenge`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING

import httpx2

from .challenge import BearerChallenge
from .errors import TesseraError

if TYPE_CHECKING:
    from .task import Task

log = logging.getLogger("tessera_sdk")


class TaskAuth(httpx2.Auth):
    requires_request_body = True  # the body is sent again after a step-up

    def __init__(self, task: Task) -> None:
        self.task = task
        self.last_challenge: BearerChallenge | None = None

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        raise TypeError("tessera_sdk tasks are asynchronous: use an httpx2.AsyncClient")

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        try:
            token = await self.task.token()
        except TesseraError:
            if not self.task.ended:
                raise
            # An ended task: its last token, revoked, so the server answers 401.
            if self.task.current is not None:
                request.headers["Authorization"] = f"Bearer {self.task.current.access_token}"
            yield request
            return
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request

        challenge = BearerChallenge.parse(response.headers.get("www-authenticate"))
        if challenge is not None:
            self.last_challenge = challenge
        if response.status_code == 401 and not self.task.ended:
            log.info("task %s: token refused (401), exchanging a new one", self.task.task_id)
            request.headers["Authorization"] = f"Bearer {await self.task.refresh()}"
            yield request
        elif (
            response.status_code == 403
            and challenge is not None
            and challenge.error == "insufficient_scope"
            and challenge.scope
            and not self.task.ended
        ):
            if not self.task.may_step_up(challenge.scope):
                log.warning(
                    "task %s: server wants %s, beyond what the task may hold (%s)",
                    self.task.task_id,
                    " ".join(sorted(challenge.scope)),
                    " ".join(sorted(self.task.may_hold)),
                )
                return
            log.info("task %s: stepping up to %s", self.task.task_id, " ".join(sorted(challenge.scope)))
            request.headers["Authorization"] = f"Bearer {await self.task.step_up(challenge.scope)}"
            yield request
