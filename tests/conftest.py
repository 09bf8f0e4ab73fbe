"""Shared fixtures: a private runtime dir per test session, and the {ism, tcp} x {asyncio, uvloop} matrix."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile

import pytest

# A private runtime dir for the embedded device of this test session (and its child processes).
_RUNTIME = tempfile.mkdtemp(prefix="smcish-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
os.chmod(_RUNTIME, 0o700)
os.environ.setdefault("SMCISH_RUNTIME_DIR", _RUNTIME)
os.environ.pop("SMCISH_DEVICE", None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_RUNTIME, ignore_errors=True)


LOOPS = ["asyncio", "uvloop"]
PATHS = ["ism", "tcp"]


def new_loop(kind: str):
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class Env:
    """One configuration of the matrix: which loop, and whether smcish may use shared memory."""

    def __init__(self, loop_kind: str, path: str) -> None:
        self.loop_kind = loop_kind
        self.path = path
        self.errors: list[dict] = []

    @property
    def kw(self) -> dict:
        """Keywords for smcish calls: forced fallback uses the 'none' device."""
        return {"device": "none"} if self.path == "tcp" else {}

    @property
    def expected_mode(self) -> str:
        return self.path

    def run(self, coro, timeout: float = 60.0):
        """Run a coroutine on a fresh loop of this kind; fail on any unhandled loop exception."""
        loop = new_loop(self.loop_kind)
        loop.set_exception_handler(lambda lp, ctx: self.errors.append(ctx))
        try:
            result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
            loop.run_until_complete(asyncio.sleep(0.01))    # let connection_lost callbacks run
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        if self.errors:
            ctx = self.errors[0]
            pytest.fail(f"unhandled loop exception: {ctx.get('message')}: {ctx.get('exception')!r}")
        return result

    def __repr__(self) -> str:
        return f"{self.path}-{self.loop_kind}"


@pytest.fixture(params=[(p, lk) for p in PATHS for lk in LOOPS], ids=lambda v: f"{v[0]}-{v[1]}")
def env(request):
    path, loop_kind = request.param
    return Env(loop_kind, path)


@pytest.fixture(params=LOOPS)
def loop_kind(request):
    return request.param


def python_env(**extra) -> dict:
    """Environment for child processes: this checkout importable, same runtime dir."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


PYTHON = sys.executable
