"""Integration tests: real frameworks, real servers, real processes (marked ``integration``).

Helpers shared by the modules of this package: start an example as a child process, read the
JSON lines it prints (bounded waits), always stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

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


class Child:
    """A child process printing JSON lines on stdout; stderr is kept for failure messages."""

    def __init__(self, argv: list[str], env: dict | None = None, prefix: list[str] | None = None,
                 cwd: str = ROOT) -> None:
        self.argv = [*(prefix or []), *argv]
        self._errfile = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._errfile,
                                     env=env or child_env(), cwd=cwd, text=True,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.lines: list[dict] = []
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = ""

    def stderr(self) -> str:
        self._errfile.flush()
        self._errfile.seek(0)
        return self._errfile.read()

    def _describe(self) -> str:
        return f"{' '.join(self.argv)}\nstdout lines: {self.lines}\nstderr:\n{self.stderr()[-4000:]}"

    def read_json(self, timeout: float = 20.0) -> dict:
        """The next JSON line (non-JSON lines are skipped); AssertionError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            if "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                self.lines.append(obj)
                return obj
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no JSON line within {timeout}s from\n{self._describe()}")
            if not self._sel.select(min(left, 0.5)):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536).decode()
            if not chunk:
                self.proc.wait(5)
                raise AssertionError(f"exited ({self.proc.returncode}) before a JSON line:\n"
                                     f"{self._describe()}")
            self._buf += chunk

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"still running after {timeout}s:\n{self._describe()}") from None

    def stop(self) -> None:
        """SIGTERM the child's process group (it may have children: ip netns exec, smcish run),
        SIGKILL if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._sel.close()
        self.proc.stdout.close()

    def close(self) -> None:
        self.stop()
        self._errfile.close()


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
