"""The notes agent in Python: one task, its tools called with the official
MCP client, tokens from the node agent through tessera_sdk.

    python notes_agent.py --task T --scopes "notes:read" [--may-hold "notes:read notes:write"]
                          [--server http://127.0.0.1:8080/mcp] [--resource https://notes.example/mcp]
                          STEP...

Steps: `list_notes`, `add_note:TEXT`, `delete_note:ID`, each optionally
suffixed `@ok` (default) or `@refused` (the server must refuse it: 403 the
task could not step up from). A `403 insufficient_scope` inside `--may-hold`
is stepped up transparently. Approval requests print the command an
operator runs. Exit 0 if every step went as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tessera_sdk import Approval, OAuthError, task


def announce(approval: Approval) -> None:
    print(f"approval: task {approval.task_id} waits for: tessera approvals approve {approval.id}", flush=True)


async def run(args: argparse.Namespace) -> int:
    scopes = args.scopes.split()
    may_hold = args.may_hold.split() if args.may_hold else scopes
    failures = 0
    async with task(args.task, resource=args.resource, scopes=scopes, may_hold=may_hold, on_approval=announce) as t:
        print(f"task {args.task}: granted {' '.join(sorted(t.scopes))}", flush=True)
        auth = t.auth()
        async with (
            httpx2.AsyncClient(auth=auth, timeout=30) as http,
            Client(streamable_http_client(args.server, http_client=http)) as mcp,
        ):
            for step in args.steps:
                call, _, expect = step.partition("@")
                name, _, arg = call.partition(":")
                arguments: dict[str, object] = {}
                if name == "add_note":
                    arguments = {"text": arg}
                elif name == "delete_note":
                    arguments = {"note_id": int(arg)}
                before = set(t.scopes)
                try:
                    result = await mcp.call_tool(name, arguments)
                    outcome = "ok"
                    detail = " ".join(getattr(c, "text", "") for c in result.content)
                except Exception as e:  # the MCP client reports an HTTP refusal as an error
                    outcome = "refused"
                    challenge = auth.last_challenge
                    detail = f"{type(e).__name__}; server said {challenge.header() if challenge else 'nothing'}"
                stepped = f" (stepped up to {' '.join(sorted(t.scopes))})" if set(t.scopes) != before else ""
                print(f"tool {name} -> {outcome}{stepped}: {detail}", flush=True)
                if outcome != (expect or "ok"):
                    print(f"  expected {expect or 'ok'}", flush=True)
                    failures += 1
    print(f"task {args.task}: ended, its tokens are revoked", flush=True)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--scopes", required=True)
    parser.add_argument("--may-hold", default="")
    parser.add_argument("--server", default="http://127.0.0.1:8080/mcp")
    parser.add_argument("--resource", default="https://notes.example/mcp")
    parser.add_argument("steps", nargs="*")
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except OAuthError as e:
        print(f"exchange: {e.error}: {e.description}", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
