"""`python -m benchmarks`: run the smcish benchmarks (see docs/benchmarks.md, or `--help`)."""

import sys

from .harness import main

sys.exit(main())
