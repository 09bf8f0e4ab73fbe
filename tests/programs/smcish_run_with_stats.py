"""``smcish run`` that prints smcish's stats (a JSON line) at exit, for
tests/integration/test_redis_transparent.py: ``python smcish_run_with_stats.py PROGRAM ARGS...``.
"""

import atexit
import json
import sys

import smcish
from smcish.__main__ import main

atexit.register(lambda: print(json.dumps({"smcish_stats": smcish.stats()}), flush=True))
sys.exit(main(["run", *sys.argv[1:]]))
