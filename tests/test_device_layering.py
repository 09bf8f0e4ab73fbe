"""ism_backend is layered bottom-up with no import circle (docs/design.md section 5).

Two checks: the source (every ``import`` of a package module, found with ``ast``, names a
strictly lower layer) and the running interpreter (each module imported alone, in layer order,
in a fresh interpreter whose ``ism_backend`` package skips ``__init__``, loads no later module).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import ism_backend  # (after device_helpers, which makes a bare checkout importable)
from benchmarks.children import python_argv
from device_helpers import PROGRAMS, REPO, child_env

# The package under test, wherever it was imported from: the checkout, or the installed wheel.
PACKAGE = Path(ism_backend.__file__).resolve().parent
# module -> layer; a module may import only modules of strictly lower layers.
LAYERS = {
    "errors": 0, "contract": 1, "memfd": 2, "sockets": 2, "proto": 3, "control": 4, "policy": 5,
    "embedded": 6, "daemon": 6, "client": 6, "factory": 7, "__init__": 8, "__main__": 9,
    # guest mode (docs/vm.md): the link codec sits on errors; the host broker, the guest agent
    # (an Ismd subclass) and the harness above the device layers they use
    "vmlink": 1, "vmhost": 7, "vmguest": 7, "vmharness": 8,
}


def package_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x, y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "ism_backend":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ism_backend" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_is_in_a_layer():
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(LAYERS)


def test_no_module_imports_its_layer_or_a_later_one():
    offenders = []
    for module, layer in LAYERS.items():
        for imported in package_imports(module):
            if LAYERS[imported] >= layer:
                offenders.append(f"{module} (layer {layer}) imports {imported} "
                                 f"(layer {LAYERS[imported]})")
    assert not offenders, offenders


def test_each_module_loads_alone_in_layer_order():
    order = sorted((m for m in LAYERS if not m.startswith("__")), key=LAYERS.get)
    proc = subprocess.run(python_argv(script=PROGRAMS / "load_in_layer_order.py",
                                      args=[PACKAGE, json.dumps(order)]),
                          capture_output=True, text=True, env=child_env(), cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for name in order:
        later = [m for m in report[name] if LAYERS[m] > LAYERS[name]]
        assert not later, f"importing {name} loaded later modules {later}"
    # and the package as users see it: one import, every public name
    proc = subprocess.run([sys.executable, "-c", "import ism_backend, json; print(json.dumps("
                           "sorted(ism_backend.__all__)))"], capture_output=True, text=True,
                          env=child_env(), cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    exported = set(json.loads(proc.stdout))
    assert {"Device", "DeviceGone", "DeviceProtocolError", "IsmError", "NoDevice", "NoneDevice",
            "PermissionDenied", "QuotaExceeded", "Region", "UnknownToken", "get_device",
            "open_device", "Advert", "PeerInfo", "Handle"} <= exported


def test_the_daemon_entry_points_still_run():
    for argv in (["-m", "ism_backend", "--help"], ["-m", "ism_backend.daemon", "status", "--help"]):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              env=child_env(), cwd=str(REPO), timeout=60)
        assert proc.returncode == 0 and "ismd" in proc.stdout, proc.stderr
        assert "RuntimeWarning" not in proc.stderr, proc.stderr
    scripts = Path(sys.executable).parent / "ismd"
    if scripts.exists():
        proc = subprocess.run([str(scripts), "--help"], capture_output=True, text=True,
                              env=child_env(), cwd=str(REPO), timeout=60)
        assert proc.returncode == 0 and "ismd" in proc.stdout, proc.stderr
