"""Child Python processes for tests and benchmarks: start, handshake, talk, stop; every wait bounded.

    with spawn_python(script="tests/programs/stat_holder.py", handshake="ready") as child:
        port = int(child.hello.split()[1])
        ...                     # child.send_line(...), child.read_line(5.0), child.read_json(5.0)
    # left the block: SIGTERM, a bounded wait, SIGKILL, reaped; pipes and the stderr file closed
    # child.finish(grace) for a child that exits at EOF on stdin: stdin closed, grace s, then the same

`Child` wraps any argv (a Python module or script, or a wrapper in front of one: ``prefix=["unshare",
...]``). Its stdout is read through our own buffer from the raw pipe, so a `select` never misses lines
already read; its stderr goes by default to a temporary file whose tail is in every error, so a child that
dies or stays silent says why. Errors are `ChildError` (an AssertionError: a test failure), as
`ChildTimeout` (also a TimeoutError) or `ChildExited` (also an EOFError).

Children get `python_env()` unless told otherwise: this tree's root (the checkout, or the copy of
tests/, benchmarks/, examples/ that ``scripts/wheel.py test`` runs from) first on PYTHONPATH, the
rest of our environment (SMCISH_RUNTIME_DIR, ...) inherited, and the root as working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


class _Capture:
    def __repr__(self) -> str:
        return "CAPTURE"


CAPTURE: Any = _Capture()  # stderr into a temporary file, shown in errors (the default)
STOP_TIMEOUT = 10.0  # stop(): how long a child has after SIGTERM, then again after SIGKILL
STDERR_TAIL = 4000


class ChildError(AssertionError):
    """A child process did not do what was expected of it (exited, stayed silent, would not stop)."""


class ChildTimeout(ChildError, TimeoutError):
    """No line (or no exit) within the time given."""


class ChildExited(ChildError, EOFError):
    """The child closed its stdout (exited) before the line asked for."""


def python_env(**extra: object) -> dict[str, str]:
    """Our environment with this tree's root first on PYTHONPATH, and ``extra`` (values as str)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def python_argv(*, module: str | None = None, script: str | os.PathLike[str] | None = None,
                args: Iterable[object] = (), prefix: Sequence[str] = ()) -> list[str]:
    """``[*prefix, python, -m module | script, *args]``: exactly one of ``module`` and ``script``."""
    if (module is None) == (script is None):
        raise ValueError("python_argv: give exactly one of module= and script=")
    target = ["-m", module] if module is not None else [os.fspath(script)]  # type: ignore[arg-type]
    return [*prefix, PYTHON, *target, *(str(a) for a in args)]


Handshake = str | Callable[[str], Any] | None


def _name_of(argv: Sequence[str]) -> str:
    """A short name for messages: the module or script Python runs, else the program."""
    for i, arg in enumerate(argv[:-1]):
        if arg == PYTHON:
            nxt = argv[i + 1]
            if nxt == "-m" and i + 2 < len(argv):
                return argv[i + 2]
            return "python -c" if nxt == "-c" else os.path.basename(nxt)
    return os.path.basename(argv[0]) if argv else "child"


class Child:
    """A child process with optional stdin/stdout pipes and its stderr kept for error messages.

    ``argv``: the command. ``env``: its environment (default `python_env()`); ``cwd`` (default the
    root). ``stdin`` / ``stdout``: PIPE (default), None (inherit ours) or DEVNULL. ``stderr``: CAPTURE
    (default: a temporary file), None (inherit: pytest's capture shows it), DEVNULL, an open file, or
    a path to write it to. ``pass_fds``, ``preexec_fn``: as `subprocess.Popen`. ``new_session``: the
    child leads a process group of its own and stop/kill signal the whole group (children of a
    wrapper such as ``ip netns exec`` or ``smcish run`` too).

    ``handshake``: wait (at most ``handshake_timeout`` s) for the first stdout line that starts with
    this string, or for which this function returns something true (a ValueError in it, such as a
    JSON decoding error, counts as false); the line is ``self.hello``, lines before it are in
    ``self.early``. The child is stopped if the handshake fails.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = ROOT,
                 stdin: int | None = PIPE, stdout: int | None = PIPE, stderr: Any = CAPTURE,
                 pass_fds: Sequence[int] = (), preexec_fn: Callable[[], Any] | None = None,
                 new_session: bool = False, name: str | None = None, handshake: Handshake = None,
                 handshake_timeout: float = 20.0) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or _name_of(self.argv)
        self.new_session = new_session
        self.hello: str | None = None
        self.early: list[str] = []
        self._buf = b""
        self._eof = False
        self._stderr_text: str | None = None   # kept when the stderr file is closed
        self._own_err: IO[Any] | None = None
        self._err_path: str | None = None
        if stderr is CAPTURE:
            self._own_err = tempfile.TemporaryFile("w+b")  # noqa: SIM115 - closed by stop()
            err: Any = self._own_err
        elif isinstance(stderr, (str, os.PathLike)):
            self._err_path = os.fspath(stderr)
            self._own_err = open(self._err_path, "wb")  # noqa: SIM115 - closed by stop()
            err = self._own_err
        else:
            err = stderr
        try:
            self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout, stderr=err,
                                         env=dict(env) if env is not None else python_env(), cwd=cwd,
                                         pass_fds=tuple(pass_fds), preexec_fn=preexec_fn,
                                         start_new_session=new_session)
        except BaseException:
            self._close_stderr()
            raise
        self.pid = self.proc.pid
        if handshake is not None:
            try:
                self.hello = self.read_until(handshake, handshake_timeout, keep=self.early)
            except BaseException:
                self.stop()
                raise

    # --- what the child said -------------------------------------------------------------------

    def stderr_text(self, tail: int | None = STDERR_TAIL) -> str:
        """What the child wrote on stderr so far (its last ``tail`` characters), if we keep it."""
        if self._stderr_text is None:
            if self._own_err is None:
                return ""
            try:
                self._own_err.flush()
                if self._err_path is not None:
                    with open(self._err_path, "rb") as fh:
                        data = fh.read()
                else:
                    self._own_err.seek(0)
                    data = self._own_err.read()
                    self._own_err.seek(0, os.SEEK_END)
            except (OSError, ValueError):
                return ""
            text = data.decode(errors="replace")
        else:
            text = self._stderr_text
        return text if tail is None else text[-tail:]

    def describe(self) -> str:
        """The child's command, state and stderr tail: for error messages."""
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited rc={rc}"
        out = f"{self.name} (pid {self.pid}, {state}): {' '.join(self.argv)}"
        if self.early:
            out += f"\nstdout before the handshake: {self.early[-20:]}"
        if self._own_err is not None or self._stderr_text is not None:
            out += f"\nstderr:\n{self.stderr_text()}"
        return out

    def _reap_briefly(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1.0)  # an exit that closed stdout: its status, for the message

    def read_line(self, timeout: float = 20.0) -> str:
        """The next stdout line (without its newline); ChildTimeout / ChildExited otherwise."""
        if self.proc.stdout is None:
            raise ValueError(f"{self.name}: stdout is not a pipe")
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if self._eof:
                self._reap_briefly()
                raise ChildExited(f"exited before a line ({len(self._buf)} bytes of a partial one): "
                                  f"{self.describe()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildTimeout(f"said nothing within {timeout:.3g} s: {self.describe()}")
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                if not sel.select(left):
                    continue
            chunk = os.read(fd, 1 << 20)
            if chunk:
                self._buf += chunk
            else:
                self._eof = True
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def read_until(self, want: str | Callable[[str], Any], timeout: float = 20.0,
                   keep: list[str] | None = None) -> str:
        """The first line that starts with ``want`` (a str) or makes ``want(line)`` true (a
        ValueError counts as false); earlier lines are appended to ``keep``, if given."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.read_line(max(0.0, deadline - time.monotonic()))
            except ChildTimeout:
                raise ChildTimeout(f"no line {'starting with ' if isinstance(want, str) else 'for '}"
                                   f"{want!r} within {timeout} s: {self.describe()}") from None
            if isinstance(want, str):
                matched = line.startswith(want)
            else:
                try:
                    matched = bool(want(line))
                except ValueError:
                    matched = False
            if matched:
                return line
            if keep is not None:
                keep.append(line)

    def read_json(self, timeout: float = 20.0, skip_other: bool = False) -> Any:
        """The next line as JSON; ``skip_other``: skip lines that are not JSON."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.0, deadline - time.monotonic()))
            try:
                return json.loads(line)
            except ValueError:
                if not skip_other:
                    raise ChildError(f"not a JSON line: {line!r} from {self.describe()}") from None

    def output(self, timeout: float = 30.0) -> tuple[int, str]:
        """Close stdin, read stdout to its end and wait for the exit: (status, the rest of stdout)."""
        deadline = time.monotonic() + timeout
        self.close_stdin()
        chunks = []
        if self.proc.stdout is not None:
            while True:
                try:
                    chunks.append(self.read_line(max(0.0, deadline - time.monotonic())) + "\n")
                except ChildExited:
                    chunks.append(self._buf.decode(errors="replace"))
                    self._buf = b""
                    break
        return self.wait(max(0.0, deadline - time.monotonic())), "".join(chunks)

    # --- talking to it ---------------------------------------------------------------------------

    def send_line(self, line: str) -> None:
        """Write one line on the child's stdin (BrokenPipeError if it is gone)."""
        if self.proc.stdin is None:
            raise ValueError(f"{self.name}: stdin is not a pipe")
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def send_json(self, obj: Any) -> None:
        self.send_line(json.dumps(obj))

    def close_stdin(self) -> None:
        """Close our end of the child's stdin (it reads EOF)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):  # BrokenPipeError flushing: it is gone already
                self.proc.stdin.close()

    # --- its life --------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 30.0) -> int:
        """Its exit status, waiting at most ``timeout`` s (ChildTimeout; it keeps running)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ChildTimeout(f"still running after {timeout} s: {self.describe()}") from None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child (to its process group with ``new_session``) unless it was reaped."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.pid, sig)
            else:
                self.proc.send_signal(sig)

    def kill(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGKILL and reap (bounded); the pipes stay open (what it wrote can still be read)."""
        self.send_signal(signal.SIGKILL)
        return self.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int | None:
        """Stop the child: ``sig`` (SIGTERM), at most ``timeout`` s for it to exit, then SIGKILL and at
        most ``timeout`` s more; reaped, pipes and the stderr file closed. Idempotent; its exit status
        (negative: the signal), ChildTimeout if even SIGKILL did not end it in time."""
        try:
            if self.proc.poll() is None:
                self.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill(timeout)
        finally:
            self._close_pipes()
        return self.proc.returncode

    def finish(self, grace: float, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int | None:
        """The end of a child that exits by itself at EOF on its stdin: close its stdin, at most ``grace``
        s for it to exit, then `stop` (``sig``, ``timeout``, SIGKILL: only the pipes if it has exited)."""
        if self.proc.poll() is None:
            self.close_stdin()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        return self.stop(timeout, sig)

    def close(self) -> int | None:
        return self.stop()

    def _close_pipes(self) -> None:
        self.close_stdin()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._close_stderr()

    def _close_stderr(self) -> None:
        if self._own_err is not None:
            self._stderr_text = self.stderr_text(None)
            with contextlib.suppress(OSError):
                self._own_err.close()
            self._own_err = None

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.pid} rc={self.proc.returncode}>"


def spawn_python(*, module: str | None = None, script: str | os.PathLike[str] | None = None,
                 args: Iterable[object] = (), prefix: Sequence[str] = (), **kw: Any) -> Child:
    """A `Child` running ``python -m module`` or ``python script`` with ``args`` (see `python_argv`);
    the other keywords go to `Child`."""
    return Child(python_argv(module=module, script=script, args=args, prefix=prefix), **kw)
