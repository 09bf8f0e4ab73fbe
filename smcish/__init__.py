"""smcish: same-host TCP connections accelerated through shared memory, with the asyncio API.

Entry points mirror asyncio's: ``open_connection``/``start_server`` (streams),
``create_connection``/``create_server`` (protocols), ``install``/``loop_factory`` (transparent mode)
and ``python -m smcish run script.py`` for unchanged programs. ``stats()``, ``metrics_text()``
(Prometheus) and ``metrics_json()`` report this process's counters.
"""

import logging as _logging

from ._version import __version__ as __version__
from .clc import DeclineReason
from .config import Config
from .errors import HandshakeError, PeerReset, SmcError
from .loop import create_connection, create_server, install, loop_factory
from .metrics import metrics_json, metrics_text
from .policy import set_policy
from .stats import stats
from .streams import open_connection, start_server
from .transport import SmcInfo, SmcTransport
from .zerocopy import ZeroCopyProtocol, send_buffer

__all__ = [
    "Config",
    "DeclineReason",
    "HandshakeError",
    "PeerReset",
    "SmcError",
    "SmcInfo",
    "SmcTransport",
    "ZeroCopyProtocol",
    "create_connection",
    "create_server",
    "install",
    "loop_factory",
    "metrics_json",
    "metrics_text",
    "open_connection",
    "send_buffer",
    "set_policy",
    "start_server",
    "stats",
]

# A library leaves logging to the application: with no handler of its own, Python would print
# WARNING records through its last-resort handler. (Child loggers such as smcish.fallback
# propagate here.)
for _name in ("smcish", "ism_backend"):
    _logger = _logging.getLogger(_name)
    if not any(isinstance(h, _logging.NullHandler) for h in _logger.handlers):
        _logger.addHandler(_logging.NullHandler())
del _name, _logger
