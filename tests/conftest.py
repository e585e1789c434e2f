"""Shared fixtures: one compiled-module cache per test session, so each network compiles once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL_NETWORK = "squeezenet_v1.1"  # the cheapest registered network to compile and run on 2 cores


@pytest.fixture(scope="session", autouse=True)
def module_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("module-cache")
    os.environ["HETERO_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def tvm_engine_by_default():
    """Tests of everything but engine choice run TVM's engine alone: profiling every installed engine
    (torch.compile compiles for minutes on 2 cores) belongs to tests/test_engines.py, which asks for it."""
    os.environ.setdefault("HETERO_ENGINE", "tvm")


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts (or `-m module`) the way the README does."""
    command = script.split() if script.startswith("-m ") else [str(ROOT / script)]
    return subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
