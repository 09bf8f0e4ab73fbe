"""Transparent mode for unchanged programs: `python -m smcish run script.py args...` (like smc_run)."""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
from collections.abc import Coroutine
from typing import Any

from .config import Config
from .loop import install
from .policy import set_program


class SmcEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose new loops have smcish installed."""

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        self._smc_config = config

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = install(super().new_event_loop(), self._smc_config)
        return loop


def patch_process(config: Config | None = None) -> None:
    """Make every loop this process creates accelerated: asyncio's policy and uvloop's factories."""
    asyncio.set_event_loop_policy(SmcEventLoopPolicy(config))
    try:
        import uvloop
    except ImportError:
        return
    if getattr(uvloop, "_smcish_patched", False):
        return
    original = uvloop.new_event_loop

    def new_event_loop() -> uvloop.Loop:
        loop: uvloop.Loop = install(original(), config)
        return loop

    # (uvloop's policy class is typed as Any by its stubs' absence for this attribute)
    class SmcUvloopPolicy(uvloop.EventLoopPolicy):  # type: ignore[misc]
        def _loop_factory(self) -> uvloop.Loop:
            return new_event_loop()

    original_run = uvloop.run

    def run(main: Coroutine[Any, Any, Any], *, loop_factory: Any = None, **kwargs: Any) -> Any:
        # uvloop.run binds new_event_loop as a default argument: pass ours explicitly.
        return original_run(main, loop_factory=loop_factory or new_event_loop, **kwargs)

    uvloop.new_event_loop = new_event_loop
    uvloop.EventLoopPolicy = SmcUvloopPolicy
    uvloop.run = run
    uvloop._smcish_patched = True


def run_script(argv: list[str]) -> None:
    """Run ``argv[0]`` (a script path, or ``-m module``) as __main__ with smcish installed."""
    usage = ("usage: python -m smcish run script.py [args...] | -m module [args...]\n\n"
             "Runs an unchanged asyncio program with smcish on every event loop it creates\n"
             "(asyncio's and uvloop's); settings come from the SMCISH_* environment variables\n"
             "and the acceleration policy (SMCISH_POLICY, SMCISH_CONFIG: docs/policy.md).")
    if not argv:
        raise SystemExit(usage)
    if argv[0] in ("-h", "--help"):
        print(usage)
        raise SystemExit(0)
    if argv[0].startswith("-") and argv[0] != "-m":
        raise SystemExit(f"python -m smcish run: unknown option {argv[0]!r}\n{usage}")
    patch_process()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(usage)
        sys.argv = argv[1:]
        set_program(argv[1])             # `program` policy rules match the module's name
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        set_program(os.path.basename(argv[0]))   # ... or the script's file name
        runpy.run_path(argv[0], run_name="__main__")
