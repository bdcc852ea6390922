"""The Python examples of examples/mcp against the real agent and the
Python notes server: the plain agent, and the LangGraph agent (a scripted
tool plan, no model call) whose add_note steps up from notes:read."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import EXAMPLES, SDK, Agent, NotesServer


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SDK / "src")},
        check=False,
    )


def test_the_langgraph_agent_steps_up_and_adds_its_note(agent: Agent, notes_server: NotesServer) -> None:
    done = run(str(EXAMPLES / "langgraph_agent.py"), "--server", notes_server.url, "--task", "py-langgraph")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "task py-langgraph: granted notes:read"
    assert lines[1].startswith("tool list_notes -> ")
    assert lines[2].startswith("tool add_note -> added note #")
    assert "written by a LangGraph agent" in lines[3]
    assert lines[-3] == "answer: Done: the note is added."
    assert lines[-2] == "task py-langgraph: holds notes:read notes:write"


def test_the_python_agent_example(agent: Agent, notes_server: NotesServer) -> None:
    allowed = run(
        str(EXAMPLES / "notes_agent.py"),
        "--server",
        notes_server.url,
        "--task",
        "py-example-1",
        "--scopes",
        "notes:read",
        "--may-hold",
        "notes:read notes:write",
        "add_note:from the example",
        "list_notes",
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "tool add_note -> ok (stepped up to notes:read notes:write): added note" in allowed.stdout
    refused = run(
        str(EXAMPLES / "notes_agent.py"),
        "--server",
        notes_server.url,
        "--task",
        "py-example-2",
        "--scopes",
        "notes:read",
        "add_note:sneaky@refused",
    )
    assert refused.returncode == 0, refused.stdout + refused.stderr
    assert 'error="insufficient_scope"' in refused.stdout and 'scope="notes:write"' in refused.stdout
    denied = run(
        str(EXAMPLES / "notes_agent.py"), "--server", notes_server.url, "--task", "x", "--scopes", "notes:admin"
    )
    assert denied.returncode == 2 and "exchange: access_denied" in denied.stdout
