"""Device access attempts as another uid, for tests/hardening/test_permissions.py.

    python device_as_other_uid.py UID ARGS_JSON        (started as root)

Imports everything as root, drops to uid/gid UID, then tries what ARGS_JSON names (an embedded
device's runtime_dir and endpoint_path with a token, hub_id and size; or ismd's socket path with a
token); prints one JSON line of outcomes ("ok: ..." or the error).
"""

import json
import os
import socket
import sys

import ism_backend
import ism_backend.client
import ism_backend.control
import ism_backend.daemon  # (imported as root, before the uid changes)
import ism_backend.embedded
import ism_backend.memfd
from ism_backend import IsmError

uid = int(sys.argv[1])
args = json.loads(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
out = {"uid": os.getuid()}


def attempt(name, fn):
    try:
        out[name] = "ok: " + repr(fn())[:80]
    except (IsmError, OSError) as exc:
        out[name] = f"{type(exc).__name__}: {exc}"[:200]


if "runtime_dir" in args:
    d = args["runtime_dir"]
    attempt("listdir", lambda: os.listdir(d))
    attempt("open_device", lambda: ism_backend.embedded.EmbeddedDevice(d))

    def raw():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(args["endpoint_path"])
        return "connected"
    attempt("connect_endpoint", raw)

    def request():
        c = ism_backend.control.ControlClient(args["endpoint_path"], 2.0, "endpoint")
        return c.request("attach", token=bytes.fromhex(args["token"]), access="r")
    attempt("attach_via_endpoint", request)
    if "hub_id" in args:
        def group_open():
            c = ism_backend.control.ControlClient(args["endpoint_path"], 2.0, "endpoint")
            c.request("hello", endpoint_id=os.urandom(16))
            return c.request("group_open", group_id=os.urandom(16),
                             hub_id=bytes.fromhex(args["hub_id"]),
                             token=bytes.fromhex(args["token"]), size=args["size"],
                             max_slots=128, version=1)
        attempt("group_open_via_endpoint", group_open)
if "ismd" in args:
    def daemon_attach(token):
        dev = ism_backend.client.DaemonDevice(args["ismd"])
        try:
            return dev.attach(bytes.fromhex(token), bytes(16))
        finally:
            dev.close()
    attempt("ismd_attach_live_token", lambda: daemon_attach(args["token"]))
    attempt("ismd_attach_random_token", lambda: daemon_attach(os.urandom(16).hex()))
print(json.dumps(out), flush=True)
