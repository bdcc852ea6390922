"""The task scope: per-task tokens for the life of an `async with` block.

    async with task("summarise-42", resource="https://notes.example/mcp",
                    scopes=["notes:read"], may_hold=["notes:read", "notes:write"]) as t:
        async with Client(url, auth=t.auth()) as mcp:   # official MCP client
            ...

On entry the task exchanges this process's JWT-SVID for a token (waiting for
an operator if policy wants approval); `t.token()` renews it before it
expires; `t.auth()` is an `httpx2.Auth` that re-exchanges on 401 and steps up
on `403 insufficient_scope` within `may_hold`; `t.delegate(...)` hands a
narrower token to a sub-agent; and on exit, errors included, the task is ended:
every token issued for it, delegated ones too, stops working at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from .errors import (
    ApprovalTimeout,
    AuthorizationPending,
    SlowDown,
    StepUpRefused,
    TaskEnded,
    TesseraError,
)
from .exchange import Exchange, IssuedToken, Target

if TYPE_CHECKING:
    from .auth import TaskAuth

log = logging.getLogger("tessera_sdk")


@dataclass(frozen=True)
class Approval:
    """A pending approval: an operator decides it with `tessera approvals approve ID`."""

    id: str
    task_id: str | None
    scopes: frozenset[str]
    target: str
    interval: float


ApprovalCallback = Callable[[Approval], Awaitable[None] | None]


class Task:
    """A task's tokens: see `task()` and `act_for()`, which make one."""

    def __init__(
        self,
        target: Target,
        scopes: Sequence[str],
        *,
        task_id: str | None,
        may_hold: Iterable[str] | None = None,
        ttl: float | None = None,
        may_act: str | None = None,
        on_behalf_of: str | None = None,
        on_approval: ApprovalCallback | None = None,
        approval_timeout: float | None = None,
        renew_before: float | None = None,
        exchange: Exchange | None = None,
        workload_api: str | os.PathLike[str] | None = None,
        exchange_socket: str | os.PathLike[str] | None = None,
        spiffe_id: str | None = None,
    ) -> None:
        if not scopes:
            raise ValueError("a task needs at least one scope")
        if task_id is None and on_behalf_of is None:
            raise ValueError("a task needs a task_id")
        self.target = target
        self.task_id = task_id
        self._scopes = frozenset(scopes)
        self.may_hold = frozenset(may_hold) | self._scopes if may_hold is not None else self._scopes
        self._ttl = ttl
        self._may_act = may_act
        self._on_behalf_of = on_behalf_of
        self._on_approval = on_approval
        self._approval_timeout = approval_timeout
        self._renew_before = renew_before
        self._owns_exchange = exchange is None
        self._exchange = exchange or Exchange(workload_api, exchange_socket, spiffe_id=spiffe_id)
        self._current: IssuedToken | None = None
        self._issued: list[IssuedToken] = []
        self._lock = asyncio.Lock()
        self._ended = False

    # -- the scope ---------------------------------------------------------

    async def __aenter__(self) -> Task:
        try:
            await self.token()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.end()
        except TesseraError as e:
            if exc is None:
                raise
            # Leaving on an error already: report that error, and this one beside it.
            log.error("task %s: ending it failed after an error: %s", self.task_id, e)
            exc.add_note(f"tessera: ending task {self.task_id} failed too: {e}")
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._owns_exchange:
            await self._exchange.aclose()

    # -- state -------------------------------------------------------------

    @property
    def scopes(self) -> frozenset[str]:
        """The scopes the task holds now (grows by step-up)."""
        return self._scopes

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def exchange(self) -> Exchange:
        return self._exchange

    @property
    def current(self) -> IssuedToken | None:
        """The latest token issued (its `expires_at`, `scopes`), or None before entry."""
        return self._current

    def _fresh(self, issued: IssuedToken | None, scopes: frozenset[str]) -> bool:
        if issued is None or not scopes <= issued.scopes:
            return False
        margin = self._renew_before if self._renew_before is not None else min(30.0, issued.expires_in / 4)
        return issued.expires_at - time.time() > margin

    # -- tokens ------------------------------------------------------------

    async def token(self) -> str:
        """A token for the task's scopes, valid for a while yet: the current one, or a
        new one exchanged shortly before it expires."""
        async with self._lock:
            if self._ended:
                raise TaskEnded(f"task {self.task_id} has ended")
            current = self._current
            if current is None or not self._fresh(current, self._scopes):
                current = self._current = await self._obtain(self._scopes)
            return current.access_token

    async def refresh(self) -> str:
        """A new token now (e.g. after a server answered 401), whatever the current one's life."""
        async with self._lock:
            if self._ended:
                raise TaskEnded(f"task {self.task_id} has ended")
            self._current = await self._obtain(self._scopes)
            return self._current.access_token

    def may_step_up(self, needed: Iterable[str]) -> bool:
        return frozenset(needed) <= self.may_hold

    async def step_up(self, needed: Iterable[str]) -> str:
        """A token with the task's scopes plus `needed` (all within `may_hold`, else
        `StepUpRefused`). The task holds the union from then on."""
        needed = frozenset(needed)
        if not needed <= self.may_hold:
            raise StepUpRefused(needed, self.may_hold)
        async with self._lock:
            if self._ended:
                raise TaskEnded(f"task {self.task_id} has ended")
            wanted = self._scopes | needed
            current = self._current
            if current is None or not self._fresh(current, wanted):
                current = self._current = await self._obtain(wanted)
                self._scopes = wanted
            return current.access_token

    def auth(self) -> TaskAuth:
        """An `httpx2.Auth` for MCP clients (and any httpx2 client) that sends this
        task's token, re-exchanges on 401 and steps up on 403 insufficient_scope."""
        from .auth import TaskAuth

        return TaskAuth(self)

    async def delegate(self, to: str, scopes: Sequence[str] | None = None, *, ttl: float | None = None) -> str:
        """A token the workload `to` (a SPIFFE ID) may act on (`may_act`), with `scopes`
        (default: the task's). Hand it to the sub-agent, which uses `act_for(token, ...)`;
        the exchange lets only `to` use it, and only for narrower or equal tokens."""
        wanted = frozenset(scopes) if scopes is not None else self._scopes
        if not wanted <= self.may_hold:
            raise StepUpRefused(wanted, self.may_hold)
        async with self._lock:
            if self._ended:
                raise TaskEnded(f"task {self.task_id} has ended")
            issued = await self._obtain(wanted, may_act=to, ttl=ttl)
            return issued.access_token

    async def end(self) -> None:
        """End the task now (also done on leaving the `async with`). A direct task is
        ended at the exchange (`task_id`); a delegated one revokes its own tokens."""
        async with self._lock:
            if self._ended:
                return
            self._ended = True
            if self.task_id is not None and self._on_behalf_of is None:
                await self._exchange.end_task(self.task_id)
            else:
                for issued in self._issued:
                    if issued.expires_at > time.time():
                        await self._exchange.revoke(issued.access_token)

    # -- exchange and approval ---------------------------------------------

    async def _obtain(
        self, scopes: frozenset[str], *, may_act: str | None = None, ttl: float | None = None
    ) -> IssuedToken:
        ordered = sorted(scopes)

        async def once(approval_id: str | None) -> IssuedToken:
            return await self._exchange.token(
                self.target,
                ordered,
                task_id=self.task_id if self._on_behalf_of is None else None,
                ttl=ttl if ttl is not None else self._ttl,
                may_act=may_act if may_act is not None else self._may_act,
                approval_id=approval_id,
                on_behalf_of=self._on_behalf_of,
            )

        try:
            issued = await once(None)
        except AuthorizationPending as pending:
            issued = await self._wait_for_approval(pending, scopes, once)
        if self.task_id is None:
            self.task_id = issued.task_id  # a delegated token keeps its delegator's task
        self._issued.append(issued)
        # Keep only what may still need revoking at the end.
        self._issued = [i for i in self._issued if i.expires_at > time.time()]
        return issued

    async def _wait_for_approval(
        self,
        pending: AuthorizationPending,
        scopes: frozenset[str],
        once: Callable[[str | None], Awaitable[IssuedToken]],
    ) -> IssuedToken:
        approval = Approval(pending.approval_id, self.task_id, scopes, self.target.value, pending.interval)
        if self._on_approval is not None:
            result = self._on_approval(approval)
            if inspect.isawaitable(result):
                await result
        else:
            log.warning("task %s waits for an operator: tessera approvals approve %s", self.task_id, approval.id)
        started = time.monotonic()
        interval = approval.interval
        while True:
            if self._approval_timeout is not None and time.monotonic() - started + interval > self._approval_timeout:
                raise ApprovalTimeout(approval.id, time.monotonic() - started)
            await asyncio.sleep(interval)
            try:
                return await once(approval.id)
            except AuthorizationPending as again:
                interval = again.interval
            except SlowDown:
                interval += 5  # RFC 8628 §3.5


def task(
    task_id: str,
    *,
    scopes: Sequence[str],
    resource: str | None = None,
    audience: str | None = None,
    may_hold: Iterable[str] | None = None,
    ttl: float | None = None,
    may_act: str | None = None,
    on_approval: ApprovalCallback | None = None,
    approval_timeout: float | None = None,
    renew_before: float | None = None,
    exchange: Exchange | None = None,
    workload_api: str | os.PathLike[str] | None = None,
    exchange_socket: str | os.PathLike[str] | None = None,
    spiffe_id: str | None = None,
) -> Task:
    """A task scope: `async with task("t1", resource=URL, scopes=[...]) as t:`.

    - `resource` (an MCP server's canonical URI, RFC 8707) or `audience` (a
      logical name): the one audience of the task's tokens.
    - `scopes`: what the task asks for on entry; `may_hold`: what it may step
      up to later when a server asks (default: `scopes`).
    - `ttl`: requested lifetime in seconds (the agent may grant less).
    - `may_act`: a SPIFFE ID that may act on the task's tokens.
    - `on_approval`: called (sync or async) with the `Approval` when policy
      wants an operator; the task then polls until the decision, up to
      `approval_timeout` seconds (default: until the agent's own timeout).
    - `renew_before`: renew when less than this is left (default: a quarter of
      the lifetime, at most 30 s).
    - sockets: `SPIFFE_ENDPOINT_SOCKET`, `TESSERA_EXCHANGE_SOCKET`, or the
      arguments; `spiffe_id` picks one of several identities.
    """
    return Task(
        Target(resource=resource, audience=audience),
        scopes,
        task_id=task_id,
        may_hold=may_hold,
        ttl=ttl,
        may_act=may_act,
        on_approval=on_approval,
        approval_timeout=approval_timeout,
        renew_before=renew_before,
        exchange=exchange,
        workload_api=workload_api,
        exchange_socket=exchange_socket,
        spiffe_id=spiffe_id,
    )


def act_for(
    token: str,
    *,
    scopes: Sequence[str],
    resource: str | None = None,
    audience: str | None = None,
    ttl: float | None = None,
    may_act: str | None = None,
    on_approval: ApprovalCallback | None = None,
    approval_timeout: float | None = None,
    renew_before: float | None = None,
    exchange: Exchange | None = None,
    workload_api: str | os.PathLike[str] | None = None,
    exchange_socket: str | os.PathLike[str] | None = None,
    spiffe_id: str | None = None,
) -> Task:
    """A sub-agent's scope acting for the holder of `token` (a token from
    `Task.delegate` naming this workload): `async with act_for(token, resource=URL,
    scopes=[...]) as t:`. The tokens keep the delegator's task and principal,
    name this workload as actor, and are never wider than `token`; on exit
    they are revoked (the delegator's task goes on)."""
    return Task(
        Target(resource=resource, audience=audience),
        scopes,
        task_id=None,
        ttl=ttl,
        may_act=may_act,
        on_behalf_of=token,
        on_approval=on_approval,
        approval_timeout=approval_timeout,
        renew_before=renew_before,
        exchange=exchange,
        workload_api=workload_api,
        exchange_socket=exchange_socket,
        spiffe_id=spiffe_id,
    )
