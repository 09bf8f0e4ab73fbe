"""The sans-I/O set-up state machine (smcish/clc.py): transitions, writes, timers, races."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smcish import clc
from smcish.clc import (
    PHASE_ACCEPTED,
    PHASE_CLAIMED,
    PHASE_DECLINED,
    PHASE_FINAL_ISM,
    PHASE_FINAL_TCP,
    Aborted,
    Established,
    FellBack,
    SetupMachine,
    SetupStateError,
)
from smcish.clc import DeclineReason as R
from smcish.clc import SetupState as S

T = 2.0


def events(m):
    out = []
    while True:
        e = m.next_event()
        if e is None:
            return out
        out.append(e)


def test_phases_match_the_c_header():
    from smcish import ring

    assert (PHASE_CLAIMED, PHASE_FINAL_ISM, PHASE_FINAL_TCP) == (
        ring.PHASE_CLAIMED, ring.PHASE_FINAL_ISM, ring.PHASE_FINAL_TCP)
    assert (PHASE_ACCEPTED, PHASE_DECLINED) == (ring.PHASE_ACCEPTED, ring.PHASE_DECLINED)


def test_happy_path_both_sides():
    c = SetupMachine("client", 0.0, T)
    s = SetupMachine("server", 0.0, T)
    c.claim(7, 0.0)
    assert c.state is S.CLAIMED and c.deadline == T
    s.accept(7, 0.1)
    assert s.state is S.WAIT_FINAL and s.deadline == pytest.approx(0.1 + 2 * T)
    c.observe(7, PHASE_ACCEPTED, 0, 0.2)
    assert c.state is S.ACCEPTED_SEEN and c.take_write() is None
    c.confirm(0.3)
    assert c.take_write() == (PHASE_FINAL_ISM, 0)
    assert events(c) == [Established()]
    s.observe(7, PHASE_FINAL_ISM, 0, 0.4)
    assert events(s) == [Established()] and s.done


def test_server_decline_makes_client_fall_back_by_peer():
    c = SetupMachine("client", 0.0, T)
    c.claim(1, 0.0)
    s = SetupMachine("server", 0.0, T)
    s.decline(R.NO_MEMORY, 0.1, gen=1)
    assert s.take_write() == (PHASE_DECLINED, R.NO_MEMORY)
    assert events(s) == [FellBack(R.NO_MEMORY, False)]
    c.observe(1, PHASE_DECLINED, R.NO_MEMORY, 0.2)
    assert c.take_write() == (PHASE_FINAL_TCP, R.NO_MEMORY)
    assert events(c) == [FellBack(R.NO_MEMORY, True)]


def test_records_of_another_gen_are_ignored_by_the_client():
    c = SetupMachine("client", 0.0, T)
    c.claim(5, 0.0)
    c.observe(4, PHASE_ACCEPTED, 0, 0.1)
    c.observe(6, PHASE_DECLINED, 0, 0.1)
    c.observe(5, 99, 0, 0.1)                     # unknown phase
    assert c.state is S.CLAIMED and events(c) == []


def test_client_timer_writes_final_tcp_and_a_late_accept_changes_nothing():
    c = SetupMachine("client", 0.0, T)
    c.claim(3, 0.0)
    c.handle_timer(T - 0.01)
    assert c.state is S.CLAIMED
    c.handle_timer(T)
    assert c.take_write() == (PHASE_FINAL_TCP, R.TIMEOUT)
    assert events(c) == [FellBack(R.TIMEOUT, False)]
    c.observe(3, PHASE_ACCEPTED, 0, T + 1)
    assert c.state is S.FELL_BACK and c.take_write() is None


def test_a_decision_at_the_deadline_loses_to_the_timer():
    c = SetupMachine("client", 0.0, T)
    c.claim(3, 0.0)
    c.observe(3, PHASE_ACCEPTED, 0, T)           # the notification ran after the deadline
    assert c.state is S.FELL_BACK
    assert c.take_write() == (PHASE_FINAL_TCP, R.TIMEOUT)
    c2 = SetupMachine("client", 0.0, T)
    c2.claim(3, 0.0)
    c2.observe(3, PHASE_ACCEPTED, 0, 1.0)
    c2.confirm(T + 0.5)                          # the ring took too long to build
    assert c2.state is S.FELL_BACK and c2.take_write() == (PHASE_FINAL_TCP, R.TIMEOUT)


def test_server_follows_the_clients_final_word():
    s = SetupMachine("server", 0.0, T)
    s.accept(2, 0.0)
    s.observe(2, PHASE_CLAIMED, 0, 0.1)         # not yet
    assert s.state is S.WAIT_FINAL
    s.observe(2, PHASE_FINAL_TCP, R.TIMEOUT, 0.2)
    assert events(s) == [FellBack(R.TIMEOUT, True)]


def test_server_treats_a_client_that_moved_on_as_gone():
    s = SetupMachine("server", 0.0, T)
    s.accept(2, 0.0)
    s.observe(3, PHASE_CLAIMED, 0, 0.1)          # the client reused the slot: gen 2 is over
    assert events(s) == [FellBack(R.PEER_NOT_SMCISH, True)]


def test_server_eof_before_the_final_word():
    s = SetupMachine("server", 0.0, T)
    s.accept(2, 0.0)
    s.peer_gone(0.1)
    assert events(s) == [FellBack(R.PEER_NOT_SMCISH, True)]


def test_server_timer_aborts():
    s = SetupMachine("server", 0.0, T)
    s.accept(2, 0.0)
    s.handle_timer(2 * T)
    (event,) = events(s)
    assert isinstance(event, Aborted) and event.reason is R.TIMEOUT
    assert s.take_write() is None


def test_abandon_after_accept_seen_and_before():
    for peer_first in (False, True):
        c = SetupMachine("client", 0.0, T)
        c.claim(1, 0.0)
        if peer_first:
            c.observe(1, PHASE_ACCEPTED, 0, 0.1)
        c.abandon(R.INTERNAL, 0.2)
        assert c.take_write() == (PHASE_FINAL_TCP, R.INTERNAL)
        assert events(c) == [FellBack(R.INTERNAL, False)]
        c.abandon(R.INTERNAL, 0.3)                # terminal: nothing more
        assert c.take_write() is None


def test_illegal_local_calls_are_refused():
    c = SetupMachine("client", 0.0, T)
    with pytest.raises(SetupStateError):
        c.confirm(0.0)
    with pytest.raises(SetupStateError):
        c.accept(1, 0.0)
    s = SetupMachine("server", 0.0, T)
    with pytest.raises(SetupStateError):
        s.claim(1, 0.0)
    s.accept(1, 0.0)
    with pytest.raises(SetupStateError):
        s.accept(1, 0.0)


def test_every_transition_in_the_table_is_reachable():
    seen = set()
    for (role, state, _inp), nxt in clc._TRANSITIONS.items():
        assert nxt in S
        seen.add((role, state))
    assert ("client", S.IDLE) in seen and ("server", S.IDLE) in seen


def test_decline_reasons_have_classes_and_unknown_codes_map_to_peer_declined():
    for reason in R:
        assert reason.description and reason.category != "unknown"
    assert R.from_code(0x7777) is R.PEER_DECLINED
    assert R.from_code(int(R.QUOTA)) is R.QUOTA


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["observe", "timer", "confirm", "abandon", "peer_gone"]),
                          st.integers(0, 4), st.integers(0, 5), st.floats(0, 10)), max_size=12),
       st.sampled_from(["client", "server"]))
def test_any_input_sequence_ends_consistently(inputs, role):
    """Whatever arrives, a machine emits at most one outcome and never writes after it."""
    m = SetupMachine(role, 0.0, T)
    if role == "client":
        m.claim(2, 0.0)
    else:
        m.accept(2, 0.0)
    outcomes = []
    now = 0.0
    for op, gen, phase, dt in inputs:
        now += dt
        try:
            if op == "observe":
                m.observe(gen, phase, 0, now)
            elif op == "timer":
                m.handle_timer(now)
            elif op == "confirm":
                m.confirm(now)
            elif op == "abandon" and role == "client":
                m.abandon(R.INTERNAL, now)
            elif op == "peer_gone":
                m.peer_gone(now)
        except SetupStateError:
            pass
        write = m.take_write()
        if outcomes:
            assert write is None, "wrote after the outcome"
        outcomes += events(m)
    assert len(outcomes) <= 1
    if outcomes:
        assert m.done


# ---------------------------------------------------------------- optimistic (0-RTT) claims


def optimistic_client(gen=5, now=0.0):
    c = SetupMachine("client", now, T)
    c.claim(gen, now, optimistic=True)
    assert c.state is S.OPTIMISTIC and c.deadline == now + T
    assert c.take_write() is None, "the shell publishes the OPTIMISTIC record itself"
    return c


def test_phases_of_the_optimistic_claim_match_the_c_header():
    from smcish import ring

    assert (clc.PHASE_OPTIMISTIC, clc.PHASE_WITHDRAWING) == (
        ring.PHASE_OPTIMISTIC, ring.PHASE_WITHDRAWING)
    assert len({PHASE_CLAIMED, PHASE_FINAL_ISM, PHASE_FINAL_TCP, clc.PHASE_OPTIMISTIC,
                clc.PHASE_WITHDRAWING}) == 5


def test_optimistic_happy_path_the_server_needs_no_final_word():
    c = optimistic_client()
    s = SetupMachine("server", 0.0, T)
    s.accept(5, 0.1)
    # the server re-reads the client's record after publishing ACCEPTED: still OPTIMISTIC is final
    s.observe(5, clc.PHASE_OPTIMISTIC, 0, 0.1)
    assert events(s) == [Established()] and s.done
    c.observe(5, PHASE_ACCEPTED, 0, 0.2)
    assert c.state is S.ACCEPTED_SEEN and c.deadline is None
    c.confirm(0.3)
    assert events(c) == [Established()] and c.done


def test_optimistic_accept_after_the_deadline_still_counts():
    """A server that accepted is established: the client may not turn that down for lateness."""
    c = optimistic_client()
    c.observe(5, PHASE_ACCEPTED, 0, 10 * T)
    assert c.state is S.ACCEPTED_SEEN
    c.confirm(10 * T)
    assert events(c) == [Established()]


def test_optimistic_decline_makes_the_client_resend_over_tcp():
    c = optimistic_client()
    c.observe(5, PHASE_DECLINED, R.QUOTA, 0.5)
    assert c.take_write() == (PHASE_FINAL_TCP, R.QUOTA)
    assert events(c) == [FellBack(R.QUOTA, True)]


def test_withdraw_then_the_server_was_first():
    c = optimistic_client()
    c.withdraw(R.PEER_NOT_SMCISH, 0.5)
    assert c.state is S.WITHDRAWING and c.take_write() == (clc.PHASE_WITHDRAWING, R.PEER_NOT_SMCISH)
    assert events(c) == []
    c.settle(5, PHASE_ACCEPTED, 0, 0.6)
    assert c.state is S.ACCEPTED_SEEN
    c.confirm(0.6)
    assert events(c) == [Established()]


def test_withdraw_with_a_silent_server_falls_back_with_our_reason():
    c = optimistic_client()
    c.withdraw(R.PEER_NOT_SMCISH, 0.5)
    c.take_write()
    c.settle(5, 0, 0, 0.6)
    assert c.take_write() == (PHASE_FINAL_TCP, R.PEER_NOT_SMCISH)
    assert events(c) == [FellBack(R.PEER_NOT_SMCISH, False)]
    # a record for another connection is silence too
    c2 = optimistic_client()
    c2.withdraw(R.TIMEOUT, 0.5)
    c2.settle(4, PHASE_ACCEPTED, 0, 0.6)
    assert events(c2) == [FellBack(R.TIMEOUT, False)]


def test_withdraw_then_decline_is_by_peer():
    c = optimistic_client()
    c.withdraw(R.TIMEOUT, 0.5)
    c.settle(5, PHASE_DECLINED, R.NO_MEMORY, 0.6)
    assert events(c) == [FellBack(R.NO_MEMORY, True)]


def test_optimistic_timer_withdraws_and_waits_for_settle():
    c = optimistic_client()
    c.handle_timer(T / 2)
    assert c.state is S.OPTIMISTIC, "early timer calls do nothing"
    c.handle_timer(T)
    assert c.state is S.WITHDRAWING and c.take_write() == (clc.PHASE_WITHDRAWING, R.TIMEOUT)
    assert events(c) == []


def test_server_reading_withdrawing_keeps_waiting_and_follows_the_final_word():
    s = SetupMachine("server", 0.0, T)
    s.accept(5, 0.0)
    s.observe(5, clc.PHASE_WITHDRAWING, R.TIMEOUT, 0.1)
    assert s.state is S.WAIT_FINAL and events(s) == []
    s.observe(5, PHASE_FINAL_TCP, R.TIMEOUT, 0.2)
    assert events(s) == [FellBack(R.TIMEOUT, True)]


def test_withdraw_and_settle_outside_their_states_do_nothing():
    c = SetupMachine("client", 0.0, T)
    c.claim(1, 0.0)                       # classic claim: no withdrawal
    c.withdraw(R.TIMEOUT, 0.1)
    c.settle(1, PHASE_ACCEPTED, 0, 0.1)
    assert c.state is S.CLAIMED and c.take_write() is None
    o = optimistic_client()
    o.settle(5, PHASE_ACCEPTED, 0, 0.1)   # settle before withdraw
    assert o.state is S.OPTIMISTIC


def test_abandon_while_optimistic():
    c = optimistic_client()
    c.abandon(R.INTERNAL, 0.1)
    assert c.take_write() == (PHASE_FINAL_TCP, R.INTERNAL)
    assert events(c) == [FellBack(R.INTERNAL, False)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["observe", "timer", "confirm", "abandon", "withdraw",
                                           "settle"]),
                          st.integers(4, 6), st.integers(0, 5), st.floats(0, 10)), max_size=12))
def test_any_optimistic_sequence_ends_consistently(inputs):
    m = optimistic_client()
    outcomes = []
    now = 0.0
    for op, gen, phase, dt in inputs:
        now += dt
        try:
            if op == "observe":
                m.observe(gen, phase, 0, now)
            elif op == "timer":
                m.handle_timer(now)
            elif op == "confirm":
                m.confirm(now)
            elif op == "abandon":
                m.abandon(R.INTERNAL, now)
            elif op == "withdraw":
                m.withdraw(R.PEER_NOT_SMCISH, now)
            else:
                m.settle(gen, phase, 0, now)
        except SetupStateError:
            pass
        write = m.take_write()
        if outcomes:
            assert write is None, "wrote after the outcome"
        if write is not None:
            assert write[0] in (clc.PHASE_WITHDRAWING, PHASE_FINAL_TCP, PHASE_FINAL_ISM)
        outcomes += events(m)
    assert len(outcomes) <= 1
    if outcomes:
        assert m.done


def test_the_set_up_timer_restarts_when_the_tcp_connection_is_up():
    for optimistic in (False, True):
        c = SetupMachine("client", 0.0, T)
        c.claim(3, 0.0, optimistic=optimistic)
        c.handle_timer(T * 0.9)
        c.connected(T * 0.9)                 # a slow connect (SYN retries)
        assert c.deadline == pytest.approx(T * 1.9)
        c.handle_timer(T * 1.5)
        assert c.state in (S.CLAIMED, S.OPTIMISTIC) and c.take_write() is None
    c.observe(3, PHASE_ACCEPTED, 0, T)
    c.connected(T)                           # after a decision: nothing changes
    assert c.deadline is None
