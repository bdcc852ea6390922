"""The sub-agent of test_mcp.py::test_a_delegation_narrows, run from a copy of
the interpreter (another executable, so another SPIFFE ID). Reads the
delegated token on stdin, acts for it with notes:read, and prints a JSON
report of what happened."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import jwt
from conftest import RESOURCE, SUB_AGENT_ID
from mcp_helpers import mcp_client

from tessera_sdk import InvalidScope, act_for


async def main(url: str, handed: str) -> dict[str, object]:
    report: dict[str, object] = {}
    async with act_for(handed, resource=RESOURCE, scopes=["notes:read"], spiffe_id=SUB_AGENT_ID) as t:
        token = await t.token()
        report["token"] = token
        report["token_claims"] = jwt.decode(token, options={"verify_signature": False})
        async with mcp_client(url, t.auth()) as (client, seen):
            await client.call_tool("list_notes", {})
            report["list_notes"] = seen.statuses[-1]
            with contextlib.suppress(Exception):  # the MCP client raises on the 403 recorded below
                await client.call_tool("add_note", {"text": "not mine to write"})
            status, challenge = seen.answers[-1]
            report["add_note"] = [status, challenge and challenge.error, sorted(challenge.scope if challenge else [])]
        try:
            async with act_for(handed, resource=RESOURCE, scopes=["notes:delete"], spiffe_id=SUB_AGENT_ID):
                report["wider"] = "issued"
        except InvalidScope as e:
            report["wider"] = e.error
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.stdin.read().strip()))))
