"""Finalisers and garbage collection must never call into a device or take a lock.

v1 deadlocked here: in transparent mode a ``weakref.finalize`` on a socket that the application
connected through the patched ``loop.sock_connect`` and then dropped ran during a garbage
collection that happened while the embedded device's mutex was held, and called back into the
device (open_connection -> loop.create_connection -> _connect_claimed -> EmbeddedDevice.claim ->
_SlotFiles.alive -> (GC) weakref.finalize -> _release_preclaim -> release_claim -> ... -> the
mutex: blocked forever). Two tests catch that class of bug:

- ``test_transparent_mode_under_gc_pressure``: a child process (with a watchdog) runs many
  connections in transparent mode, including sockets connected through the patched
  ``loop.sock_connect`` and then dropped without being handed to ``create_connection``, raw use
  of such sockets, and transports, protocols and sockets dropped in reference cycles, with
  ``gc.set_threshold(1, 1, 1)`` and full collections forced from inside device and link-group
  calls (a profile hook on every thread runs ``gc.collect()`` at the entry of ism_backend and
  smcish.linkgroup functions called from such functions, that is, where their locks are held;
  ``gc.callbacks`` record where every collection ran: a callback cannot run a collection
  itself, CPython ignores ``gc.collect()`` during one). The child must finish, with every
  connection accounted for. Against v1 (``FINALIZER_ROOT=/tmp/oldmain``) it hangs: see
  docs/reliability.md.
- ``test_no_finaliser_calls_a_device_or_takes_a_lock``: a static check of every ``__del__``,
  ``weakref.finalize``/``weakref.ref`` callback, ``gc.callbacks`` entry, signal handler and
  ``ffi.gc`` destructor in smcish/ and ism_backend/.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import smcish

from .conftest import PYTHON, ROOT

# The tree under test (another checkout: FINALIZER_ROOT=/tmp/oldmain runs the child against v1).
TARGET = os.environ.get("FINALIZER_ROOT", ROOT)
# Where the static check reads smcish/ and ism_backend/: that other checkout, or else the
# directory the packages under test were imported from (the checkout, or site-packages when
# testing the installed wheel).
SOURCES = os.environ.get("FINALIZER_ROOT") or os.path.dirname(os.path.dirname(
    os.path.abspath(smcish.__file__)))
WATCHDOG = float(os.environ.get("FINALIZER_WATCHDOG", "60"))

CHILD = os.path.join(ROOT, "tests", "programs", "gc_pressure_child.py")


def run_child(root: str, loop: str = "asyncio", connections: int = 100, in_flight: int = 4,
              force_p: float = 0.25, seed: int = 1, watchdog: float = WATCHDOG) -> dict:
    """Run CHILD (tests/programs/gc_pressure_child.py) against the tree at ``root`` in a runtime
    dir of its own; returns its summary, or {"hung": stderr} when the watchdog fired (or the
    process had to be killed)."""
    runtime = tempfile.mkdtemp(prefix="smcish-fin-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                               else None)
    os.chmod(runtime, 0o700)
    env = dict(os.environ, PYTHONPATH=root, SMCISH_RUNTIME_DIR=runtime,
               SMCISH_HANDSHAKE_TIMEOUT="0.5")
    env.pop("SMCISH_DEVICE", None)
    cfg = {"loop": loop, "connections": connections, "in_flight": in_flight, "seed": seed,
           "force_p": force_p, "watchdog": watchdog, "settle": 10.0}
    try:
        proc = subprocess.run([PYTHON, CHILD, json.dumps(cfg)], capture_output=True,
                              text=True, env=env, cwd=root, timeout=watchdog + 30)
    except subprocess.TimeoutExpired as exc:
        return {"hung": f"killed after {watchdog + 30} s: {exc.stderr!r}"[-4000:]}
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if proc.returncode != 0:
        return {"hung" if "Timeout (" in proc.stderr else "failed": proc.stderr[-6000:],
                "rc": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_transparent_mode_under_gc_pressure(loop):
    """200 connections in transparent mode (smcish.install), 4 at a time, five kinds in turn:
    create_connection; sock_connect then create_connection(sock=); sock_connect then the socket
    dropped in an old reference cycle, never handed over; sock_connect then sock_sendall /
    sock_recv on the socket itself; create_connection then abort(); transports, protocols and
    sockets dropped in reference cycles. With gc.set_threshold(1, 1, 1) and full collections
    forced inside device and link-group calls, the child finishes before its watchdog, every
    connection the server accepted ended, no pre-claim is left, and collections really ran
    inside device/group calls."""
    out = run_child(TARGET, loop=loop, connections=200)
    assert "hung" not in out, f"the child hung (watchdog): {out['hung']}"
    assert "failed" not in out, out["failed"]
    stats = out["stats"]
    print(f"\n{loop}: {out['server_made']} connections accepted, {out['server_lost']} ended, "
          f"{stats.get('collections', 0)} collections ({stats.get('full_collections', 0)} full, "
          f"{stats.get('collections_inside_device_or_group_calls', 0)} inside device/group "
          f"calls, {stats.get('forced_full_collections', 0)} forced there); "
          f"{ {k: v for k, v in stats.items() if k.startswith(('kind_', 'mode_'))} }; "
          f"{out['work_s']:.1f} s of work")
    assert out["n_errors"] == 0, out["errors"]
    assert out["server_made"] == 200, out
    assert out["server_lost"] == out["server_made"], out
    assert out["preclaims"] in (0, None), out
    for name in ("kind_create_connection", "kind_sock_connect_handed_over",
                 "kind_sock_connect_dropped", "kind_sock_connect_raw", "kind_abort_in_cycle"):
        assert stats.get(name) == 40, (name, stats)
    assert stats.get("mode_ism", 0) > 0, stats           # transparent mode really accelerated
    assert stats.get("forced_full_collections", 0) > 100, stats
    assert stats.get("collections_inside_device_or_group_calls", 0) > 100, stats


# ------------------------------------------------------------------ the static check

PACKAGES = ("smcish", "ism_backend")
# What a finaliser (or GC callback, signal handler, ffi destructor) may call: nothing that takes
# a lock or talks to a device. Names are matched on the call's last attribute or bare name.
ALLOWED_CALLS = {
    "_warn", "warn",                  # warnings.warn(ResourceWarning)
    "abort",                          # self._tcp.abort(): the loop's transport, no lock, no device
    "repr", "isinstance", "getattr", "len",
    "is_closed",                      # loop.is_closed(): reads a flag
}
FORBIDDEN_WORDS = ("lock", "mutex", "acquire", "device", "peer_request", "claim", "detach",
                   "free", "attach", "alloc", "withdraw", "release_", "flock", "_request")


def _sources():
    for pkg in PACKAGES:
        base = os.path.join(SOURCES, pkg)
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as fh:
                        yield os.path.relpath(path, SOURCES), ast.parse(fh.read(), path)


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ast.dump(func)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _finalisers():
    """(where, kind, function node or None, target description) for every finaliser-like hook."""
    for path, tree in _sources():
        functions = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(node.name, node)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__del__":
                yield f"{path}:{node.lineno}", "__del__", node, node.name
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            target = None
            if name.endswith("finalize") and len(node.args) >= 2:
                target, kind = node.args[1], "weakref.finalize"
            elif name in ("weakref.ref", "ref", "weakref.proxy") and len(node.args) >= 2:
                target, kind = node.args[1], "weakref callback"
            elif name in ("gc.callbacks.append", "callbacks.append"):   # not self._callbacks
                target, kind = node.args[0], "gc.callbacks"
            elif name in ("signal.signal",) and len(node.args) >= 2:
                target, kind = node.args[1], "signal handler"
            elif name.endswith("ffi.gc") or (name.endswith(".gc") and "ffi" in name):
                target, kind = node.args[1] if len(node.args) >= 2 else None, "ffi.gc"
            if target is None:
                continue
            if isinstance(target, ast.Lambda):
                fn = target
            elif isinstance(target, ast.Name):
                fn = functions.get(target.id)
            else:
                fn = None
            yield f"{path}:{node.lineno}", kind, fn, ast.unparse(target)


def test_no_finaliser_calls_a_device_or_takes_a_lock():
    """Every __del__, weakref.finalize / weakref callback, gc.callbacks entry, signal handler and
    ffi.gc destructor in smcish/ and ism_backend/: the code it runs (its body; a lambda's or a
    module function's) makes only calls from a short allow-list (warnings, the loop transport's
    abort), takes no `with` (no lock, no context manager), and names nothing
    like a lock, a mutex or a device operation."""
    found = []
    problems = []
    for where, kind, fn, target in _finalisers():
        found.append(f"{where} {kind} -> {target}")
        body = fn
        if body is None:
            problems.append(f"{where}: {kind} target {target} is not a function of its module: "
                            "cannot check it (inline it or allow-list it)")
            continue
        for node in ast.walk(body):
            if isinstance(node, (ast.With, ast.AsyncWith)):
                problems.append(f"{where}: {kind} {target} uses `with` at line {node.lineno}")
            if isinstance(node, ast.Call):
                name = _call_name(node)
                if name not in ALLOWED_CALLS:
                    problems.append(f"{where}: {kind} {target} calls {name}() at line "
                                    f"{node.lineno}")
            if isinstance(node, (ast.Attribute, ast.Name)):
                text = node.attr if isinstance(node, ast.Attribute) else node.id
                if any(word in text.lower() for word in FORBIDDEN_WORDS):
                    problems.append(f"{where}: {kind} {target} refers to {text} at line "
                                    f"{node.lineno}")
    print("\nfinaliser-like hooks found:\n  " + "\n  ".join(found or ["none"]))
    assert not problems, "\n".join(problems)
    assert found, "the scan found no finaliser at all: is it looking at the right tree?"


def test_the_static_check_catches_v1_style_finalisers(tmp_path, monkeypatch):
    """The check itself: a tree with v1's finaliser (weakref.finalize(sock, _release_preclaim,
    key) whose target calls a device's release_claim) is reported."""
    pkg = tmp_path / "smcish"
    pkg.mkdir()
    (tmp_path / "ism_backend").mkdir()
    (pkg / "loop.py").write_text(
        "import weakref\n"
        "_preclaims = {}\n"
        "def _release_preclaim(key):\n"
        "    entry = _preclaims.pop(key, None)\n"
        "    if entry is not None:\n"
        "        entry[1].release_claim(entry[0])\n"
        "def claim(sock, key, dev):\n"
        "    _preclaims[key] = (dev.claim(key), dev)\n"
        "    weakref.finalize(sock, _release_preclaim, key)\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCES", str(tmp_path))
    with pytest.raises(AssertionError, match="release_claim"):
        test_no_finaliser_calls_a_device_or_takes_a_lock()
