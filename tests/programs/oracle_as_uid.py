"""As uid 1234 (started as root): a listener, then the socket oracle asked about it; prints JSON.

For tests/test_device_sockets.py: an unprivileged user can use the oracle (it names the listener
and its uid) but cannot read socket namespaces (SIOCGSKNS needs CAP_NET_ADMIN: netns null).
"""

import json
import os
import socket

from ism_backend import sockets

os.setgroups([])
os.setgid(1234)
os.setuid(1234)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
port = server.getsockname()[1]
hit = sockets.diag().lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40008))
print(json.dumps({"uid": os.getuid(), "inode": hit.inode, "mine": os.fstat(server.fileno()).st_ino,
                  "hit_uid": hit.uid, "netns": sockets.socket_netns(server),
                  "facts_netns": sockets.listener_facts(server).netns}))
