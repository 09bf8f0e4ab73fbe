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
PROGRAMS = os.path.join(ROOT, "tests", "programs")  # the child programs the tests run
if ROOT not in sys.path:  # benchmarks/ (children.py) for plain `pytest`, not `python -m pytest`
    sys.path.insert(0, ROOT)

from benchmarks import children  # noqa: E402 - needs ROOT on sys.path

# Wheel mode: `python3 scripts/wheel.py test` runs this suite against the installed wheel, from a
# copy of tests/ (with examples/, benchmarks/) that holds no smcish/ nor ism_backend/, with
# SMCISH_TEST_INSTALLED=1. Then, before any test: both packages (and the compiled ring) come from
# this venv's site-packages, and the venv's import guard (scripts/wheel.py GUARD, loaded by a .pth
# in every process of the venv, so in every child process the tests start) is active.
INSTALLED = os.environ.get("SMCISH_TEST_INSTALLED") == "1"


def installed_problems() -> list[str]:
    """Why this session would not be testing the installed wheel (empty: it is)."""
    import sysconfig

    import ism_backend
    import smcish
    import smcish._ring

    site = sorted({os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    problems = []
    if sys.prefix == sys.base_prefix:
        problems.append(f"{sys.executable} is not a virtualenv's interpreter")
    for module in (smcish, smcish._ring, ism_backend):
        where = os.path.realpath(module.__file__)
        if not any(where.startswith(s + os.sep) for s in site):
            problems.append(f"{module.__name__} was imported from {where}, not from {site}")
    for name in ("smcish", "ism_backend"):
        if os.path.exists(os.path.join(ROOT, name)):
            problems.append(f"the test root {ROOT} holds {name}/, which child processes "
                            f"(PYTHONPATH={ROOT}) would import")
    guard = sys.modules.get("_smcish_wheel_guard")
    if guard is None or not guard.active():
        problems.append("the import guard of scripts/wheel.py is not active: child processes "
                        "would not be checked")
    return problems


_problems = installed_problems() if INSTALLED else []
if _problems:
    raise pytest.UsageError("SMCISH_TEST_INSTALLED=1, but this is not a run against the installed "
                            "wheel:\n  " + "\n  ".join(_problems))


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
    """Environment for child processes: this checkout importable, same runtime dir (see
    benchmarks/children.py python_env)."""
    return children.python_env(**extra)


def program(name: str) -> str:
    """The path of tests/programs/``name``."""
    return os.path.join(PROGRAMS, name)


PYTHON = sys.executable
