"""Integration tests: real frameworks, real servers, real processes (marked ``integration``).

Helpers shared by the modules of this package: start an example as a child process, read the
JSON lines it prints (bounded waits), always stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

from benchmarks import children

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
PYTHON = sys.executable


def child_env(**extra) -> dict:
    """Environment for child processes: this checkout importable, the session's runtime dir."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("SMCISH_DEVICE", None)
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


class Child(children.Child):
    """A child process printing JSON lines on stdout; stderr is kept for failure messages. It leads
    a process group of its own: stop() signals its children too (ip netns exec, smcish run)."""

    def __init__(self, argv: list[str], env: dict | None = None, prefix: list[str] | None = None,
                 cwd: str = ROOT) -> None:
        super().__init__([*(prefix or []), *argv], env=env or child_env(), cwd=cwd, stdin=None,
                         new_session=True)
        self.lines: list[dict] = []

    def stderr(self) -> str:
        return self.stderr_text(None)

    def describe(self) -> str:
        return f"{super().describe()}\nstdout lines: {self.lines}"

    def read_json(self, timeout: float = 20.0) -> dict:
        """The next JSON line (non-JSON lines are skipped); AssertionError on timeout or exit."""
        obj = super().read_json(timeout, skip_other=True)
        self.lines.append(obj)
        return obj

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return super().wait(timeout)
        except children.ChildTimeout:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM the child's process group, SIGKILL if it lingers (5 s each)."""
        return super().stop(timeout, sig)


@contextlib.contextmanager
def spawn(argv: list[str], **kw):
    child = Child(argv, **kw)
    try:
        yield child
    finally:
        child.close()


def run_json(argv: list[str], env: dict | None = None, timeout: float = 60.0,
             prefix: list[str] | None = None) -> dict:
    """Run a client to completion; return its last JSON line (asserting exit status 0)."""
    proc = subprocess.run([*(prefix or []), *argv], capture_output=True, text=True,
                          env=env or child_env(), cwd=ROOT, timeout=timeout)
    lines = []
    for line in proc.stdout.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    assert proc.returncode == 0 and lines, (
        f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return lines[-1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
