"""Coverage-guided fuzzing of the handshake codec and state machine (smcish.clc), bounded in time.

Two engines, one target (``one_input``):
- atheris (libFuzzer, coverage-guided), when it is installed (``pip install atheris``):
  ``python tests/hardening/test_fuzz_codec.py --atheris -max_total_time=20``
- a small built-in coverage-guided mutational fuzzer (``sys.settrace`` arc coverage of clc.py, a
  corpus that keeps every input reaching a new arc, libFuzzer-like mutations), so CI needs no extra
  dependency: ``python tests/hardening/test_fuzz_codec.py --builtin 20``

``pytest tests/hardening/test_fuzz_codec.py`` runs atheris if importable, else the built-in engine,
for ``FUZZ_SECONDS`` (default 20) seconds.

Invariants (any violation raises, i.e. is a crash for the engine):
- ``decode`` raises only ``ClcError``; ``(None, 0)`` only for a magic prefix or a message not yet
  complete; a message consumes ``12 <= n <= min(512, len)`` bytes and re-encodes to exactly them;
  a resyncable error points at an intact frame (magic, trailer where the length says); the result
  never depends on bytes after the message;
- a server and a client ``ClcConnection`` fed the input in input-derived chunks (and EOF, and timer
  expiries) raise nothing but ``ClcStateError`` for calls their state forbids; at most one
  FellBack/Aborted; ``FellBack.data`` is a suffix of the input and the consumed prefix is a run of
  whole messages; everything they send is a run of valid messages.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if __name__ == "__main__" and "--atheris" in sys.argv:
    import atheris  # noqa: E402

    with atheris.instrument_imports():
        from smcish import clc  # noqa: E402
else:
    from smcish import clc  # noqa: E402

R = clc.DeclineReason
GID = bytes(range(16))
EP = bytes(range(16, 32))
TOKEN = bytes(range(32, 48))


def _valid_run(data: bytes, intact_ok: bool = False) -> bool:
    """Is ``data`` a sequence of whole messages? (``intact_ok``: messages that were skipped for
    their contents, with intact framing, count as whole: the codec declines past them)."""
    pos = 0
    while pos < len(data):
        try:
            msg, n = clc.decode(data[pos:])
        except clc.ClcError as exc:
            if not (intact_ok and exc.resync):
                return False
            msg, n = True, exc.length
        if msg is None:
            return False
        pos += n
    return True


def _check_decode(data: bytes) -> None:
    try:
        msg, n = clc.decode(data)
    except clc.ClcError as exc:
        if exc.resync:
            length = exc.length
            assert clc.MIN_MESSAGE <= length <= min(clc.MAX_MESSAGE, len(data)), length
            assert data[:4] == clc.MAGIC and data[length - 4:length] == clc.TRAILER
            try:
                clc.decode(data[:length])
            except clc.ClcError as again:
                assert again.resync and again.length == length
            else:
                raise AssertionError("resync error depends on the bytes after the message")
        return
    if msg is None:
        assert n == 0
        if len(data) >= clc.HEADER_SIZE:
            length = int.from_bytes(data[6:8], "big")
            assert len(data) < length, "complete message reported incomplete"
        else:
            assert clc.MAGIC.startswith(data[:4])
        return
    assert clc.MIN_MESSAGE <= n <= min(clc.MAX_MESSAGE, len(data)), n
    assert clc.encode(msg) == data[:n], "not canonical"
    again, n2 = clc.decode(data[:n])
    assert again == msg and n2 == n, "result depends on the bytes after the message"


def _chunks(data: bytes, seed: int):
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 7, 13, 64, 512, len(data)))
        yield data[pos:pos + step]
        pos += step


def _drive(role: str, data: bytes, seed: int) -> None:
    rng = random.Random(seed ^ 0x5A5A)
    now = 0.0
    conn = clc.ClcConnection(role, now, timeout=2.0)
    sent = bytearray()
    if role == "server":
        conn.wait_proposal(now)
    else:
        sent += conn.propose(clc.Proposal(1, 1, 0, GID, EP, TOKEN, 14), now)
    ends = 0
    established = 0
    fed = bytearray()
    finished = False

    def drain_events():
        nonlocal ends, established, finished
        while True:
            event = conn.next_event()
            if event is None:
                return
            if isinstance(event, clc.ProposalReceived):
                assert role == "server"
                if rng.random() < 0.6:
                    sent.extend(conn.accept(clc.Accept(event.version, 0, GID, EP, TOKEN, 14), now))
                else:
                    sent.extend(conn.decline(R.NO_MEMORY, now))
            elif isinstance(event, clc.AcceptReceived):
                assert role == "client"
                if rng.random() < 0.7:
                    sent.extend(conn.confirm(now))
                else:
                    sent.extend(conn.decline(R.ATTACH_FAILED, now))
            elif isinstance(event, clc.Established):
                established += 1
                assert established == 1
            elif isinstance(event, clc.FellBack):
                ends += 1
                assert ends == 1, "two endings"
                assert bytes(fed).endswith(event.data), "FellBack.data is not a suffix"
                consumed = bytes(fed[:len(fed) - len(event.data)])
                assert _valid_run(consumed, intact_ok=True), \
                    "consumed bytes are not whole messages"
                finished = True
            elif isinstance(event, clc.Aborted):
                ends += 1
                assert ends == 1 or established, "two endings"
                finished = True

    for chunk in _chunks(data, seed):
        if finished:
            break
        fed += chunk
        conn.receive_data(chunk, now)
        sent += conn.data_to_send()
        drain_events()
        if rng.random() < 0.05:
            now += rng.choice((0.5, 1.1, 2.5))
            if conn.get_timer() is not None and now >= conn.get_timer():
                sent += conn.handle_timer(now)
                drain_events()
    if not finished and rng.random() < 0.5:
        conn.receive_eof(now)
        sent += conn.data_to_send()
        drain_events()
    now += 10.0
    if not finished and conn.get_timer() is not None:
        sent += conn.handle_timer(now)
        drain_events()
    sent += conn.data_to_send()
    assert _valid_run(bytes(sent)), "sent bytes are not whole valid messages"


def one_input(data: bytes) -> None:
    data = bytes(data)
    seed = zlib.crc32(data)
    _check_decode(data)
    _drive("server", data, seed)
    _drive("client", data, seed)


# ------------------------------------------------------------------ built-in coverage-guided fuzzer

def seeds() -> list[bytes]:
    p = clc.encode(clc.Proposal(1, 1, 0, GID, EP, TOKEN, 14))
    a = clc.encode(clc.Accept(1, 0, GID, EP, TOKEN, 14))
    c = clc.encode(clc.Confirm())
    d = clc.encode(clc.Decline(R.TIMEOUT))
    dp = clc.encode(clc.Decline(R.PEER_DECLINED))
    return [b"", b"SMC", p, a, c, d, dp, p + c, a + c, p[:30], d + b"hello", p + p, a + a + c,
            b"GET / HTTP/1.1\r\n\r\n", p + b"data after", dp + d, a + d]


_INTERESTING16 = (0, 1, 11, 12, 13, 14, 52, 64, 65, 511, 512, 513, 0x7FFF, 0xFFFF)


def mutate(data: bytes, corpus: list, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        op = rng.randrange(11)
        if op == 0 and buf:                                       # bit flip
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:                                     # random byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:                                             # insert bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = os.urandom(rng.choice((1, 2, 4, 16)))
        elif op == 3 and buf:                                     # delete a range
            i = rng.randrange(len(buf))
            del buf[i:i + rng.choice((1, 2, 4, 16, 64))]
        elif op == 4 and buf:                                     # duplicate a range
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i:i + rng.choice((1, 4, 12, 65))]
        elif op == 5 and corpus:                                  # splice
            other = rng.choice(corpus)
            buf = buf[:rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1):]
        elif op == 6 and len(buf) >= 8:                           # length field
            buf[6:8] = rng.choice(_INTERESTING16).to_bytes(2, "big")
        elif op == 7 and len(buf) >= 6:                           # type / version byte
            buf[rng.choice((4, 5))] = rng.choice((0, 1, 2, 3, 4, 5, 255))
        elif op == 8:                                             # magic or trailer somewhere
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.choice((clc.MAGIC, clc.TRAILER))
        elif op == 9 and buf:                                     # truncate
            del buf[rng.randrange(len(buf)):]
        elif op == 10 and len(buf) > 8:                           # body byte to an edge value
            buf[rng.randrange(8, len(buf))] = rng.choice((0, 1, 11, 12, 30, 31, 255))
    return bytes(buf[:2048])


def builtin_fuzz(seconds: float, rng_seed: int = 0) -> dict:
    """Run ``one_input`` under arc coverage of clc.py; keep inputs that reach new arcs."""
    target_file = os.path.abspath(clc.__file__)
    arcs: set = set()
    current: set = set()

    def local(frame, event, arg):
        if event == "line":
            code = frame.f_code
            key = (code.co_firstlineno, frame.f_lineno)
            current.add((code.co_firstlineno, local.prev.get(id(frame)), frame.f_lineno))
            local.prev[id(frame)] = frame.f_lineno
        elif event == "return":
            local.prev.pop(id(frame), None)
        return local
    local.prev = {}

    def global_trace(frame, event, arg):
        if frame.f_code.co_filename == target_file:
            return local
        return None

    rng = random.Random(rng_seed)
    corpus = list(seeds())
    execs = 0
    crashes = []
    deadline = time.monotonic() + seconds
    queue = list(corpus)
    while time.monotonic() < deadline:
        if queue:
            data = queue.pop()
        else:
            data = mutate(rng.choice(corpus), corpus, rng)
        current.clear()
        sys.settrace(global_trace)
        try:
            one_input(data)
        except Exception as exc:  # noqa: BLE001 - a crash: keep the input
            crashes.append((data, repr(exc)))
        finally:
            sys.settrace(None)
        execs += 1
        new = current - arcs
        if new:
            arcs |= new
            corpus.append(data)
        if len(crashes) >= 5:
            break
    return {"execs": execs, "corpus": len(corpus), "arcs": len(arcs), "crashes": crashes,
            "seconds": seconds}


def test_codec_fuzz_bounded():
    seconds = float(os.environ.get("FUZZ_SECONDS", "20"))
    try:
        import atheris  # noqa: F401
        have_atheris = True
    except ImportError:
        have_atheris = False
    if have_atheris:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        corpus_dir = tempfile.mkdtemp(prefix="clc-corpus-")
        for i, seed in enumerate(seeds()):
            with open(os.path.join(corpus_dir, f"seed{i}"), "wb") as fh:
                fh.write(seed)
        try:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--atheris",
                 f"-max_total_time={int(seconds)}", "-rss_limit_mb=1024", "-print_final_stats=1",
                 "-max_len=1024", corpus_dir],
                capture_output=True, text=True, env=env, timeout=seconds + 60, cwd=corpus_dir)
        finally:
            shutil.rmtree(corpus_dir, ignore_errors=True)
        out = proc.stderr[-3000:]
        assert proc.returncode == 0, f"atheris found a crash:\n{out}"
        assert "Done" in out or "stat::number_of_executed_units" in out, out
        print(out[-800:])
    else:
        stats = builtin_fuzz(seconds)
        print({k: v for k, v in stats.items() if k != "crashes"})
        assert not stats["crashes"], stats["crashes"][:3]
        assert stats["execs"] > 500, stats


if __name__ == "__main__":
    if "--atheris" in sys.argv:
        argv = [a for a in sys.argv if a != "--atheris"]
        atheris.Setup(argv, one_input)
        atheris.Fuzz()
    else:
        secs = float(sys.argv[sys.argv.index("--builtin") + 1]) if "--builtin" in sys.argv else 20
        result = builtin_fuzz(secs)
        print({k: v for k, v in result.items() if k != "crashes"})
        for data, err in result["crashes"]:
            print("CRASH", data.hex(), err)
        sys.exit(1 if result["crashes"] else 0)
