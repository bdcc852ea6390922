"""README.md's five-minute walk-through, run as written against `tessera run
--dev` in an empty directory, with the operator's approval given the way the
README says; its output must be what the README shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import SDK, stop, tessera_bin, wait_for


def walkthrough_blocks() -> tuple[str, list[str]]:
    readme = (SDK / "README.md").read_text()
    section = readme.split("## Five-minute walk-through", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    shown = re.search(r"It prints.*?```\n(.*?)```", section, re.S)
    assert code and shown, "the walk-through lost its code or its output"
    return code.group(1), shown.group(1).strip().splitlines()


def test_the_readme_walkthrough_runs_as_written() -> None:
    code, expected = walkthrough_blocks()
    with tempfile.TemporaryDirectory(prefix="tessera-sdk-readme.") as tmp:
        cwd = Path(tmp)
        (cwd / "walkthrough.py").write_text(code)
        agent_log = cwd / "agent.log"
        agent = subprocess.Popen(
            [str(tessera_bin()), "run", "--dev"], cwd=cwd, stdout=agent_log.open("wb"), stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: (cwd / ".tessera" / "exchange.sock").exists(), "tessera run --dev", agent)
            env = {
                **os.environ,
                "SPIFFE_ENDPOINT_SOCKET": f"unix://{cwd}/.tessera/agent.sock",
                "PYTHONPATH": str(SDK / "src"),
            }
            env.pop("TESSERA_EXCHANGE_SOCKET", None)
            run = subprocess.Popen(
                [sys.executable, "walkthrough.py"], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True
            )
            assert run.stdout is not None
            lines = []
            for line in run.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("waiting for: tessera "):
                    # The operator, in a third terminal, runs the printed command.
                    command = line.split("waiting for: ", 1)[1].split()
                    done = subprocess.run(
                        [str(tessera_bin()), *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=30
                    )
                    assert done.returncode == 0, done.stderr
            assert run.wait(timeout=60) == 0, lines
        finally:
            stop(agent)
        assert len(lines) == len(expected), lines
        for got, want in zip(lines, expected, strict=True):
            pattern = re.escape(want).replace(
                re.escape("spiffe://example.org/user/you"), r"spiffe://example\.org/user/\S+"
            )
            pattern = pattern.replace(re.escape("apr_..."), r"apr_\S+")
            assert re.fullmatch(pattern, got), (got, want)
