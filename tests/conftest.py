"""Shared fixtures: one compiled-module cache per test session, so each network compiles once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL_NETWORK = "squeezenet_v1.1"  # the cheapest registered network to compile and run on 2 cores


# Tests that import TVM's tensor intrinsics (tvm.s_tir.tensor_intrin): MetaSchedule's tuning imports them all, the
# wmma schedules and the checks against TVM's own layouts the CUDA ones.
NEEDS_TVMS_INTRINSICS = ("test_schedules_cuda.py", "test_tune.py")


def pytest_sessionstart(session):
    """Import TVM's tensor intrinsics before collection where the session runs a test that needs them. Their import
    parses a few hundred TVMScript functions, each looking its callers' frames up among the interpreter's modules:
    on 2 cores that took ~300 s of CPU once the test modules were collected (torch, Ray, tritonclient, ...
    imported), and ~90 s before."""
    needed = [ROOT / "tests" / name for name in NEEDS_TVMS_INTRINSICS]
    for arg in session.config.args:
        path = Path(arg.split("::")[0]).resolve()
        if any(file == path or file.is_relative_to(path) for file in needed):
            import tvm.s_tir.tensor_intrin  # noqa: F401
            return


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
