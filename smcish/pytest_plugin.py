"""pytest plugin: run a project's own asyncio tests over smcish (entry point ``pytest11``).

    pytest --smcish=ism                  every new event loop gets transparent mode (``install``)
    pytest --smcish=tcp                  the same with no shared-memory device: every connection
                                         falls back (``SMCISH_DEVICE=none`` while each test runs)
    pytest --smcish=both                 each test function twice, ``[smcish-ism]`` and ``[smcish-tcp]``
    pytest --smcish=ism --smcish-strict  a test whose connections fell back to TCP fails

Per test, the connections this process made (``smcish.stats()`` before and after the test's setup,
call and teardown) are recorded as ``user_properties`` (``smcish_mode``, ``smcish_ism``,
``smcish_tcp``, ``smcish_fallbacks``: in ``--junitxml`` too) and listed at the end of the run.
Counts are connection *ends* in the pytest process: a test whose client and server both run in
it counts each connection twice; connections of child processes are not seen.

"Every new event loop": loops made through an event loop policy (``asyncio.run``,
``asyncio.Runner``, ``asyncio.new_event_loop``, pytest-asyncio's loops) and uvloop's
(``uvloop.new_event_loop``, ``uvloop.run``, ``uvloop.EventLoopPolicy``). A loop built by calling
a loop class directly (``asyncio.SelectorEventLoop()``) is not patched.

Without ``--smcish`` the plugin does nothing: it only declares its options, the
``smcish_allow_tcp`` marker and the ``smcish_mode`` fixture (``None`` then).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import pytest

MODES = ("ism", "tcp", "both")
ALLOW_TCP = "smcish_allow_tcp"
Snapshot = tuple[int, int, dict[str, int]]
_START = pytest.StashKey[Snapshot]()
_CHECKED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smcish", "smcish: run asyncio tests over shared memory")
    group.addoption(
        "--smcish", choices=MODES, default=None, dest="smcish",
        help="install smcish transparent mode on every new event loop: 'ism' (shared memory), "
             "'tcp' (no device: every connection falls back), 'both' (each test twice); "
             "then report per test how many connections took which path")
    group.addoption(
        "--smcish-strict", action="store_true", default=False, dest="smcish_strict",
        help="with --smcish=ism|both: fail a shared-memory test whose connections fell back to "
             f"TCP (unless marked @pytest.mark.{ALLOW_TCP})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{ALLOW_TCP}: under --smcish-strict, this test may make connections that "
                   "fall back to TCP")
    mode = config.getoption("smcish", None)
    strict = config.getoption("smcish_strict", False)
    if mode is None:
        if strict:
            raise pytest.UsageError("--smcish-strict needs --smcish=ism or --smcish=both")
        return
    if strict and mode == "tcp":
        raise pytest.UsageError("--smcish-strict checks shared-memory runs: use it with "
                                "--smcish=ism or --smcish=both")
    config.pluginmanager.register(_SmcishRun(config, mode, strict), "smcish-run")


@pytest.fixture
def smcish_mode(request: pytest.FixtureRequest) -> str | None:
    """The path this test runs on under ``--smcish``: ``"ism"`` or ``"tcp"`` (``None`` without it)."""
    mode = request.config.getoption("smcish", None)
    return None if mode == "both" else mode   # "both" parametrizes this name directly


def _item_mode(item: pytest.Item, mode: str) -> str:
    if mode != "both":
        return mode
    callspec = getattr(item, "callspec", None)
    # Items that pytest_generate_tests does not see (doctests, unittest cases) run once, on "ism".
    return callspec.params.get("smcish_mode", "ism") if callspec is not None else "ism"


def _snapshot() -> Snapshot:
    from .stats import stats

    st = stats()
    return st["connections_ism"], st["connections_tcp"], dict(st["fallbacks"])


def _delta(before: Snapshot, after: Snapshot) -> Snapshot:
    def diff(old: int, new: int) -> int:
        return new - old if new >= old else new      # counters were reset() during the test

    reasons: dict[str, int] = {}
    for reason, count in after[2].items():
        n = diff(before[2].get(reason, 0), count)
        if n > 0:
            reasons[reason] = n
    return diff(before[0], after[0]), diff(before[1], after[1]), reasons


def _reasons_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{name}={n}" for name, n in sorted(reasons.items()))


class _LoopPatcher:
    """Give every new event loop smcish transparent mode; undone at the end of the session."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []

    def apply(self) -> None:
        from asyncio import events

        from .loop import install

        # asyncio.new_event_loop, asyncio.run, asyncio.Runner and pytest-asyncio all end in a
        # policy's new_event_loop; patching the base class covers policies set later too.
        policy_cls = events.BaseDefaultEventLoopPolicy
        policy_new = policy_cls.__dict__["new_event_loop"]

        def new_event_loop(policy: Any) -> Any:
            return install(policy_new(policy))

        policy_cls.new_event_loop = new_event_loop  # type: ignore[method-assign,assignment]  # on purpose
        self._undo.append(lambda: setattr(policy_cls, "new_event_loop", policy_new))
        try:
            import uvloop
        except ImportError:
            return
        uv_new = uvloop.new_event_loop

        def uv_new_event_loop() -> Any:
            return install(uv_new())

        # uvloop.EventLoopPolicy looks new_event_loop up in uvloop's namespace at each call.
        uvloop.new_event_loop = uv_new_event_loop
        self._undo.append(lambda: setattr(uvloop, "new_event_loop", uv_new))
        # uvloop.run binds new_event_loop as its default loop_factory: replace that default (on
        # the function object, so `from uvloop import run` done earlier is covered too).
        defaults = getattr(uvloop.run, "__kwdefaults__", None)
        if defaults and defaults.get("loop_factory") is uv_new:
            defaults["loop_factory"] = uv_new_event_loop
            self._undo.append(lambda: defaults.__setitem__("loop_factory", uv_new))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class _SmcishRun:
    """The hooks that act, registered only when ``--smcish`` is given."""

    def __init__(self, config: pytest.Config, mode: str, strict: bool) -> None:
        self.config = config
        self.mode = mode
        self.strict = strict
        self.records: list[tuple[str, str, int, int, dict[str, int]]] = []
        self.patcher = _LoopPatcher()
        self.patcher.apply()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.patcher.undo()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if self.mode != "both":
            return
        if "smcish_mode" not in metafunc.fixturenames:
            metafunc.fixturenames.append("smcish_mode")
        metafunc.parametrize("smcish_mode", ["ism", "tcp"], ids=["smcish-ism", "smcish-tcp"])

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item,
                                nextitem: pytest.Item | None) -> Generator[None, object, object]:
        mode = _item_mode(item, self.mode)
        saved = os.environ.get("SMCISH_DEVICE")
        if mode == "tcp":
            # Read per connection (smcish.Config.current()): transparent and explicit smcish
            # calls alike find no device; child processes inherit it unless given their own env.
            os.environ["SMCISH_DEVICE"] = "none"
        item.stash[_START] = _snapshot()
        try:
            return (yield)
        finally:
            if saved is None:
                os.environ.pop("SMCISH_DEVICE", None)
            else:
                os.environ["SMCISH_DEVICE"] = saved

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        if call.when == "teardown" and _START in item.stash:
            # Before the teardown report is made: it carries user_properties (--junitxml).
            ism, tcp, reasons = _delta(item.stash[_START], _snapshot())
            mode = _item_mode(item, self.mode)
            item.user_properties.extend([
                ("smcish_mode", mode), ("smcish_ism", ism), ("smcish_tcp", tcp),
                ("smcish_fallbacks", _reasons_text(reasons))])
            self.records.append((item.nodeid, mode, ism, tcp, reasons))
        report = yield
        if (self.strict and call.when in ("call", "teardown") and _START in item.stash
                and _item_mode(item, self.mode) == "ism"
                and item.get_closest_marker(ALLOW_TCP) is None):
            self._check_strict(item, report)
        return report

    def _check_strict(self, item: pytest.Item, report: pytest.TestReport) -> None:
        ism, tcp, reasons = _delta(item.stash[_START], _snapshot())
        checked = item.stash.get(_CHECKED, 0)
        item.stash[_CHECKED] = tcp
        if tcp <= checked or report.skipped or hasattr(report, "wasxfail"):
            return
        try:
            from .stats import REMEDIES as remedies
        except ImportError:                       # pragma: no cover - an older smcish.stats
            remedies = {}
        lines = [f"smcish strict: {tcp - checked} connection end(s) of this test fell back to TCP "
                 f"on --smcish=ism ({_reasons_text(reasons) or 'no reason recorded'}); "
                 f"{ism} took shared memory."]
        lines += [f"  {name}: {remedies[name]}" for name in sorted(reasons) if name in remedies]
        lines.append(f"Mark the test @pytest.mark.{ALLOW_TCP} if these fallbacks are expected.")
        message = "\n".join(lines)
        if report.passed:
            report.outcome = "failed"
            report.longrepr = message
        else:
            report.sections.append(("smcish strict", message))

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int,
                                config: pytest.Config) -> None:
        tr = terminalreporter
        title = f"smcish connections per test (--smcish={self.mode}"
        tr.write_sep("-", title + (", strict)" if self.strict else ")"))
        rows = [r for r in self.records if r[2] or r[3]]
        if rows:
            tr.write_line(" ism  tcp  path  test  [why it fell back]")
            for nodeid, mode, ism, tcp, reasons in rows:
                why = f"  [{_reasons_text(reasons)}]" if reasons else ""
                tr.write_line(f"{ism:>4} {tcp:>4}  {mode:<4}  {nodeid}{why}")
        total: dict[str, int] = {}
        for *_, reasons in self.records:
            for name, n in reasons.items():
                total[name] = total.get(name, 0) + n
        quiet = len(self.records) - len(rows)
        tr.write_line(f"total: {sum(r[2] for r in self.records)} ism, "
                      f"{sum(r[3] for r in self.records)} tcp"
                      + (f" ({_reasons_text(total)})" if total else "")
                      + f"; {quiet} test(s) made no connection. Counts are connection ends in "
                        "this process (a connection with both ends in a test counts twice).")
