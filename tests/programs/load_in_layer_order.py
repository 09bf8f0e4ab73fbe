"""Import ism_backend's modules one at a time, in the order given, without the package's __init__.

    python load_in_layer_order.py PACKAGE_DIR '["errors", "proto", ...]'

Prints JSON: for each module, the ism_backend modules loaded once it was imported (for
tests/test_device_layering.py: importing one must not load a module of a later layer).
"""

import importlib
import json
import sys
import types

pkg = types.ModuleType("ism_backend")
pkg.__path__ = [sys.argv[1]]
sys.modules["ism_backend"] = pkg          # the package without its __init__ (which loads all)
order = json.loads(sys.argv[2])
report = {}
for name in order:
    importlib.import_module("ism_backend." + name)
    report[name] = sorted(m.split(".", 1)[1] for m in sys.modules
                          if m.startswith("ism_backend."))
print(json.dumps(report))
