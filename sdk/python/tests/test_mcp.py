"""The Show items of issue 15 for Python: a real agent (`tessera`), the
official MCP Python client and server unmodified around this SDK."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jwt
import pytest
from conftest import RESOURCE, SUB_AGENT_ID, Agent, NotesServer
from mcp_helpers import mcp_client, refused_statuses, text

from tessera_sdk import AccessDenied, Approval, task

pytestmark = pytest.mark.anyio


def claims_of(token: str) -> dict[str, object]:
    """Claims read without verification, for assertions only (verification is the server's)."""
    result: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return result


async def test_a_permitted_tool_call_succeeds(agent: Agent, notes_server: NotesServer) -> None:
    async with task("py-permitted", resource=RESOURCE, scopes=["notes:read", "notes:write"]) as t:
        async with mcp_client(notes_server.url, t.auth()) as (client, seen):
            added = await client.call_tool("add_note", {"text": "buy milk"})
            listed = await client.call_tool("list_notes", {})
        assert not added.is_error and "added note" in text(added)
        assert "buy milk" in text(listed) and "task py-permitted" in text(listed)
        assert set(seen.statuses) == {200}, seen.answers


async def test_a_tool_outside_the_tasks_scopes_gets_403_insufficient_scope(
    agent: Agent, notes_server: NotesServer
) -> None:
    async with task("py-read-only", resource=RESOURCE, scopes=["notes:read"]) as t:
        async with mcp_client(notes_server.url, t.auth()) as (client, seen):
            await client.call_tool("list_notes", {})
            seen.clear()
            with pytest.raises(Exception):  # noqa: B017  the MCP client folds the 403 into an error
                await client.call_tool("add_note", {"text": "sneaky"})
        status, challenge = seen.answers[-1]
        assert status == 403
        assert challenge is not None and challenge.error == "insufficient_scope"
        assert challenge.scope == {"notes:write"}
        assert challenge.resource_metadata == "https://notes.example/.well-known/oauth-protected-resource/mcp"
        assert t.scopes == {"notes:read"}, "no step-up beyond may_hold"


async def test_step_up_inside_the_allowed_scopes_succeeds(agent: Agent, notes_server: NotesServer) -> None:
    async with task(
        "py-step-up", resource=RESOURCE, scopes=["notes:read"], may_hold=["notes:read", "notes:write"]
    ) as t:
        first = await t.token()
        async with mcp_client(notes_server.url, t.auth()) as (client, seen):
            await client.call_tool("list_notes", {})
            seen.clear()
            added = await client.call_tool("add_note", {"text": "stepped up"})
        assert not added.is_error, text(added)
        assert seen.statuses == [403, 200], seen.answers
        assert t.scopes == {"notes:read", "notes:write"}
        assert claims_of(await t.token())["scope"] == "notes:read notes:write"
        assert claims_of(first)["scope"] == "notes:read"


async def test_after_the_task_ends_the_next_call_gets_401(agent: Agent, notes_server: NotesServer) -> None:
    async with task("py-ended", resource=RESOURCE, scopes=["notes:read"]) as t:
        token = await t.token()
        async with mcp_client(notes_server.url, t.auth()) as (client, _):
            await client.call_tool("list_notes", {})
    assert t.ended
    await asyncio.sleep(0.6)  # the server's introspection cache (0.5 s)
    # The same token, sent by hand: refused.
    assert await refused_statuses(notes_server.url, headers={"Authorization": f"Bearer {token}"}) == {401}
    # Through the ended task's auth: no new token is exchanged, the call gets 401.
    assert await refused_statuses(notes_server.url, auth=t.auth()) == {401}


async def test_an_approval_round_trip(agent: Agent, notes_server: NotesServer) -> None:
    approvals: list[Approval] = []

    def operator(approval: Approval) -> None:
        approvals.append(approval)
        agent.approve(approval.id)  # what a person does with `tessera approvals approve`

    async with (
        task("py-cleanup", resource=RESOURCE, scopes=["notes:delete"], on_approval=operator) as t,
        mcp_client(notes_server.url, t.auth()) as (client, seen),
    ):
        deleted = await client.call_tool("delete_note", {"note_id": 999})
    assert [a.scopes for a in approvals] == [{"notes:delete"}]
    assert approvals[0].task_id == "py-cleanup" and approvals[0].id.startswith("apr_")
    # The call went through the guard (200) to the tool, which found no note 999.
    assert set(seen.statuses) == {200} and not deleted.is_error
    assert "no note #999" in text(deleted)


async def test_a_denied_approval_raises_access_denied(agent: Agent) -> None:
    async def operator(approval: Approval) -> None:
        agent.deny(approval.id)

    with pytest.raises(AccessDenied):
        async with task("py-denied", resource=RESOURCE, scopes=["notes:delete"], on_approval=operator):
            pytest.fail("a denied task must not start")


async def test_a_delegation_narrows(agent: Agent, notes_server: NotesServer) -> None:
    async with task("py-delegate", resource=RESOURCE, scopes=["notes:read", "notes:write"]) as t:
        handed = await t.delegate(SUB_AGENT_ID)
        # The sub-agent is another program (a copy of the interpreter, so another
        # identity): it acts for the task with notes:read only.
        sub_agent = await asyncio.create_subprocess_exec(
            str(agent.sub_agent_python),
            str(Path(__file__).parent / "sub_agent.py"),
            notes_server.url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=agent.sub_agent_env(),
        )
        out, err = await asyncio.wait_for(sub_agent.communicate(handed.encode()), 60)
        assert sub_agent.returncode == 0, err.decode()
        report = json.loads(out)
    assert claims_of(handed)["may_act"] == {"sub": SUB_AGENT_ID}
    delegated = report["token_claims"]
    assert delegated["sub"] == "spiffe://example.org/sdk/agent"  # the principal stays the delegator
    assert delegated["client_id"] == SUB_AGENT_ID
    assert delegated["act"] == {"sub": SUB_AGENT_ID}
    assert delegated["txn"] == "py-delegate"
    assert delegated["scope"] == "notes:read"
    assert delegated["exp"] <= claims_of(handed)["exp"]
    assert report["list_notes"] == 200
    assert report["add_note"] == [403, "insufficient_scope", ["notes:write"]]
    assert report["wider"] == "invalid_scope"
    # The sub-agent revoked its token when it left its scope.
    await asyncio.sleep(0.6)
    assert await refused_statuses(notes_server.url, headers={"Authorization": f"Bearer {report['token']}"}) == {401}


async def test_ending_on_an_error_still_ends_the_task(agent: Agent) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with task("py-boom", resource=RESOURCE, scopes=["notes:read"]) as t:
            token = await t.token()
            raise Boom
    async with task("py-observer", resource=RESOURCE, scopes=["notes:read"]) as observer:
        assert (await observer.exchange.introspect(token)) == {"active": False}
