"""smcish: same-host TCP connections accelerated through shared memory, with the asyncio API.

Entry points mirror asyncio's: ``open_connection``/``start_server`` (streams),
``create_connection``/``create_server`` (protocols), ``install``/``loop_factory`` (transparent mode)
and ``python -m smcish run script.py`` for unchanged programs.
"""

from .clc import DeclineReason
from .config import Config
from .errors import HandshakeError, PeerReset, SmcError
from .loop import create_connection, create_server, install, loop_factory
from .stats import stats
from .streams import open_connection, start_server
from .transport import SmcInfo, SmcTransport
from .zerocopy import ZeroCopyProtocol, send_buffer

__all__ = [
    "Config", "DeclineReason", "HandshakeError", "PeerReset", "SmcError", "SmcInfo", "SmcTransport",
    "create_connection", "create_server", "install", "loop_factory", "open_connection",
    "start_server", "stats", "ZeroCopyProtocol", "send_buffer",
]
__version__ = "0.1.0"
