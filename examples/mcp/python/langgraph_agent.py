"""A LangGraph agent whose tools are MCP tools called with per-task tokens.

The graph is LangGraph's usual agent loop (a planner node, the prebuilt
`ToolNode`, `tools_condition`), with the model replaced by a scripted plan:
no model is called, so the example runs anywhere and always does the same.
The task starts read-only and may hold notes:write; the plan's add_note is
answered 403 insufficient_scope, the SDK steps up, and the call succeeds.

    python langgraph_agent.py --server http://127.0.0.1:8080/mcp [--task T]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import httpx2
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tessera_sdk import task

RESOURCE = "https://notes.example/mcp"

# What a model would have decided: one tool call per turn, then an answer.
PLAN: list[AIMessage] = [
    AIMessage("", tool_calls=[{"name": "list_notes", "args": {}, "id": "call-1"}]),
    AIMessage("", tool_calls=[{"name": "add_note", "args": {"text": "written by a LangGraph agent"}, "id": "call-2"}]),
    AIMessage("", tool_calls=[{"name": "list_notes", "args": {}, "id": "call-3"}]),
    AIMessage("Done: the note is added."),
]


def mcp_tools(mcp: Client) -> list[StructuredTool]:
    """LangChain tools that call the MCP server's tools of the same name."""

    async def call(name: str, arguments: dict[str, Any]) -> str:
        result = await mcp.call_tool(name, arguments)
        return " ".join(getattr(c, "text", "") for c in result.content)

    async def list_notes() -> str:
        """List every note."""
        return await call("list_notes", {})

    async def add_note(text: str) -> str:
        """Add a note."""
        return await call("add_note", {"text": text})

    return [StructuredTool.from_function(coroutine=f) for f in (list_notes, add_note)]


def build_graph(tools: list[StructuredTool]) -> Any:
    plan = iter(PLAN)

    def planner(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [next(plan)]}

    graph = StateGraph(MessagesState)
    graph.add_node("planner", planner)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "planner")
    graph.add_conditional_edges("planner", tools_condition)
    graph.add_edge("tools", "planner")
    return graph.compile()


async def run(server: str, task_id: str) -> int:
    async with (
        task(task_id, resource=RESOURCE, scopes=["notes:read"], may_hold=["notes:read", "notes:write"]) as t,
        httpx2.AsyncClient(auth=t.auth(), timeout=30) as http,
        Client(streamable_http_client(server, http_client=http)) as mcp,
    ):
        print(f"task {task_id}: granted {' '.join(sorted(t.scopes))}", flush=True)
        state = await build_graph(mcp_tools(mcp)).ainvoke({"messages": [HumanMessage("Add a note.")]})
        for message in state["messages"]:
            if isinstance(message, ToolMessage):
                print(f"tool {message.name} -> {message.content}", flush=True)
        print(f"answer: {state['messages'][-1].content}", flush=True)
        print(f"task {task_id}: holds {' '.join(sorted(t.scopes))}", flush=True)
        added = any(isinstance(m, ToolMessage) and "added note" in str(m.content) for m in state["messages"])
        stepped_up = "notes:write" in t.scopes
    print(f"task {task_id}: ended, its tokens are revoked", flush=True)
    return 0 if added and stepped_up else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080/mcp")
    parser.add_argument("--task", default="langgraph-1")
    args = parser.parse_args()
    return asyncio.run(run(args.server, args.task))


if __name__ == "__main__":
    sys.exit(main())
