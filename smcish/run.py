"""Transparent mode for unchanged programs: `python -m smcish run script.py args...` (like smc_run)."""

from __future__ import annotations

import asyncio
import runpy
import sys

from .config import Config
from .loop import install


class SmcEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose new loops have smcish installed."""

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        self._smc_config = config

    def new_event_loop(self):
        return install(super().new_event_loop(), self._smc_config)


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

    def new_event_loop():
        return install(original(), config)

    class SmcUvloopPolicy(uvloop.EventLoopPolicy):
        def _loop_factory(self):
            return new_event_loop()

    original_run = uvloop.run

    def run(main, *, loop_factory=None, **kwargs):
        # uvloop.run binds new_event_loop as a default argument: pass ours explicitly.
        return original_run(main, loop_factory=loop_factory or new_event_loop, **kwargs)

    uvloop.new_event_loop = new_event_loop
    uvloop.EventLoopPolicy = SmcUvloopPolicy
    uvloop.run = run
    uvloop._smcish_patched = True


def run_script(argv: list[str]) -> None:
    """Run ``argv[0]`` (a script path, or ``-m module``) as __main__ with smcish installed."""
    if not argv:
        raise SystemExit("usage: python -m smcish run script.py [args...] | -m module [args...]")
    patch_process()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("usage: python -m smcish run -m module [args...]")
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")
