"""The SDK is a standard package, versioned with the project."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from conftest import ROOT, SDK

import tessera_sdk


def project_version() -> str:
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    return str(cargo["workspace"]["package"]["version"])


def test_the_version_is_the_projects() -> None:
    pyproject = tomllib.loads((SDK / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == project_version()
    assert tessera_sdk.__version__ == project_version()


def test_a_typed_wheel_builds_with_pip() -> None:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, str(SDK)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        wheels = list(Path(out).glob("*.whl"))
        assert [w.name for w in wheels] == [f"tessera_sdk-{project_version()}-py3-none-any.whl"]
        names = zipfile.ZipFile(wheels[0]).namelist()
        assert "tessera_sdk/py.typed" in names and "tessera_sdk/task.py" in names
        metadata = zipfile.ZipFile(wheels[0]).read(f"tessera_sdk-{project_version()}.dist-info/METADATA").decode()
        assert re.search(r"^Requires-Dist: httpx2", metadata, re.M), metadata
        assert not any(n.startswith("tests/") for n in names)
