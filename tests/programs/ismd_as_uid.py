"""Run ismd as another uid: ``python ismd_as_uid.py UID serve --socket PATH ...`` (needs root).

Everything is imported as root first (the interpreter may live under root's home, unreadable to
that uid), argparse's lazy imports too, then groups, gid and uid are dropped and ismd's main runs.
"""

import gettext  # noqa: F401 - imported as root, before the uid changes
import locale  # noqa: F401
import os
import sys

import ism_backend.daemon as d

uid = int(sys.argv[1])
d.build_parser().parse_args(sys.argv[2:])  # loads what argparse imports lazily
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.exit(d.main(sys.argv[2:]))
