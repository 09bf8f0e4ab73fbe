"""``python device_tokens.py N``: N region tokens from this process's device (alloc, free), printed
as one JSON line with the pid. For tests/hardening/test_permissions.py (token randomness).
"""

import json
import os
import sys

import ism_backend

dev = ism_backend.get_device()
out = []
for _ in range(int(sys.argv[1])):
    r = dev.alloc(512 + 16384)
    out.append(r.token.hex())
    dev.free(r)
print(json.dumps({"pid": os.getpid(), "tokens": out}))
