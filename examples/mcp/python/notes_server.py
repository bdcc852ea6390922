"""The notes MCP server in Python: the official MCP SDK (`MCPServer`,
streamable HTTP) with Tessera's token verifier and per-tool scopes.

    python notes_server.py --port 8080 [--resource https://notes.example/mcp]
                           [--issuer-url https://localhost:8443] [--introspection-cache 1]

Tools: `list_notes` (scope notes:read), `add_note` (notes:write),
`delete_note` (notes:delete). A call whose token lacks the tool's scope gets
HTTP 403 with `WWW-Authenticate: Bearer error="insufficient_scope",
scope="..."`; a revoked token (its task ended) gets 401 once the
introspection cache has expired. Prints `listening on http://HOST:PORT/mcp`
when ready. Run it where SPIFFE_ENDPOINT_SOCKET (or TESSERA_EXCHANGE_SOCKET)
points at the node agent: it fetches keys and introspects there.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import uvicorn
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token

from tessera_sdk.mcp import TesseraTokenVerifier, auth_settings
from tessera_sdk.server import ToolScopes, Verifier, resource_metadata_url

TOOL_SCOPES = {
    "list_notes": ["notes:read"],
    "add_note": ["notes:write"],
    "delete_note": ["notes:delete"],
}


def build_app(resource: str, issuer_url: str, introspection_cache: float) -> ToolScopes:
    verifier = Verifier(resource, introspection_cache=introspection_cache)
    server = MCPServer(
        "notes",
        token_verifier=TesseraTokenVerifier(verifier),
        auth=auth_settings(resource=resource, issuer_url=issuer_url),
    )
    notes: dict[int, tuple[str, str]] = {}
    next_id = [1]
    log = logging.getLogger("notes")

    def caller() -> str:
        token = get_access_token()
        if token is None:  # the SDK's bearer middleware ran first: never None here
            return "?"
        task = (token.claims or {}).get("txn")
        log.info("tool call by %s task=%s scopes=%s", token.client_id, task, " ".join(token.scopes))
        return f"{token.client_id}, task {task}"

    @server.tool()
    def list_notes() -> str:
        """List every note."""
        caller()
        return "; ".join(f'#{i} "{text}" (by {by})' for i, (text, by) in sorted(notes.items())) or "no notes"

    @server.tool()
    def add_note(text: str) -> str:
        """Add a note."""
        note_id = next_id[0]
        next_id[0] += 1
        notes[note_id] = (text, caller())
        return f"added note #{note_id}"

    @server.tool()
    def delete_note(note_id: int) -> str:
        """Delete a note by number."""
        caller()
        if notes.pop(note_id, None) is None:
            return f"no note #{note_id}"
        return f"deleted note #{note_id}"

    return ToolScopes(
        server.streamable_http_app(),
        verifier,
        TOOL_SCOPES,
        resource_metadata_url=resource_metadata_url(resource),
        # A tool added later without a line above is refused, not open.
        other_tools=["notes:admin"],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--resource", default="https://notes.example/mcp", help="the tokens' audience")
    parser.add_argument(
        "--issuer-url", default="https://localhost:8443", help="the HTTPS issuer named in the resource metadata"
    )
    parser.add_argument("--introspection-cache", type=float, default=1.0, help="seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("tessera_sdk.server").setLevel(logging.DEBUG)
    app = build_app(args.resource, args.issuer_url, args.introspection_cache)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    async def serve() -> None:
        running = asyncio.create_task(server.serve())
        while not server.started and not running.done():  # noqa: ASYNC110  uvicorn has no started event
            await asyncio.sleep(0.05)
        if server.started:
            print(f"listening on http://{args.host}:{args.port}/mcp", flush=True)
        await running

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
