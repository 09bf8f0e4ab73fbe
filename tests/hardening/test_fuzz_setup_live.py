"""Fuzzing the set-up live: a hostile client process posts hypothesis-generated set-up records and
claims (random phases, gens, ring blocks, 4-tuples, socket inodes, garbage claim entries, final
words, TCP bytes, resets) against a live smcish server in another process, one connection per
example, in one link group.

Each example must end within its bound (the hostile's command is bounded; the victim never
stalls it); afterwards the server process is alive, back to its baseline once the hostile let go
(regions, attachments, link groups, slots, fds net of caches), its healthy peer kept answering
all along, it serves a fresh smcish client over shared memory and a plain client over TCP with no
added delay, and it exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import program

from .hostile_helpers import PYTHON, ROOT, Arena, child_env, plain_client

T = 0.3
EXAMPLES = int(os.environ.get("LIVE_FUZZ_EXAMPLES", "60"))
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def arena():
    a = Arena("asyncio", timeout=T)
    a.outcomes = {}
    yield a
    a.close(check=False)


addr_st = st.sampled_from(["7f000001" + "00" * 12, "7f000002" + "00" * 12, "00" * 16,
                           "ff" * 16])
record_st = st.fixed_dictionaries({
    "gen": st.sampled_from([0, 1, 2, U32]) | st.integers(0, U32),
    "phase": st.sampled_from([0, 1, 1, 1, 2, 3, 4, 4, 5, 6]) | st.integers(0, U32),
    "reason": st.integers(0, U32),
    "family": st.sampled_from([2, 10, 0, U32]),
    "ring0_log2": st.sampled_from([16, 16, 16, 12, 11, 31, 40, 0, U32]),
    "ring0_ext": st.sampled_from([0, 0, 0, 1, 31, 32, U32]),
    "sock_ino": st.sampled_from(["real", "real", "zero"]) | st.integers(0, U64),
    "cport": st.sampled_from(["real", "real", "real"]) | st.integers(0, U32),
}, optional={"ring0_off": st.integers(0, U64), "caddr": addr_st, "saddr": addr_st,
             "sport": st.integers(0, U32)})
fuzz_st = st.fixed_dictionaries({
    "record": record_st,
    "claims": st.lists(st.one_of(st.just("real"),
                                 st.tuples(st.integers(0, 8191), st.integers(0, U64))),
                       max_size=4),
    "action": st.sampled_from(["silent", "final_ism", "final_ism", "final_tcp", "flip_gen", "rst",
                               "close"]),
    "reason": st.integers(0, U32),
    "tcp_bytes": st.binary(max_size=48).map(bytes.hex),
    "notify": st.booleans(),
})


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=fuzz_st)
def test_live_server_survives_fuzzed_setups(arena, spec):
    spec = dict(spec, decision_wait=0.05, tcp_wait=0.05)
    res = arena.hostile.request(20, cmd="fuzz", port=arena.port, args=spec, timeout=15)
    victim = res.get("victim")
    key = (victim or {}).get("phase"), res.get("action"), res.get("tcp")
    arena.outcomes[key] = arena.outcomes.get(key, 0) + 1
    assert arena.victim.alive(), arena.victim.stderr_tail()


def test_live_server_is_clean_and_serves_after_the_fuzzing(arena):
    """The hostile lets go: no leak; a fresh smcish client (another process) gets shared memory
    and an exact echo; a plain client gets TCP at once; the healthy connection never failed."""
    print("outcomes (victim phase, action, tcp end):", sorted(arena.outcomes.items(), key=str))
    arena.hostile.reset()
    arena.check("the live fuzzing")
    client = subprocess.run([PYTHON, program("echo_check_client.py"), str(arena.port)], capture_output=True,
                            text=True, env=child_env(), cwd=ROOT, timeout=60)
    assert client.returncode == 0, client.stderr[-2000:]
    out = json.loads(client.stdout.strip().splitlines()[-1])
    assert out["mode"] == "ism" and out["echo"], out
    payload = os.urandom(2000)
    res = plain_client(arena.port, payload)
    assert res["got"] == payload and res["first_byte_s"] < 0.5, res
    arena.check("fresh clients after the live fuzzing")
    closed = arena.close(check=True)
    assert closed["victim_rc"] == 0, closed
