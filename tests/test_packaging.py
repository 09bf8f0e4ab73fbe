"""Packaging (docs/packaging.md): what the wheel ships, one version, and where the tests import from.

Meaningful in both modes. In the checkout (``python -m pytest``): the build configuration lists
exactly the right packages and the sdist carries the C ring's sources. Against the installed wheel
(``python3 scripts/wheel.py test``, SMCISH_TEST_INSTALLED=1): the packages come from the venv's
site-packages, the installed files are the wheel's and only those (py.typed in, no benchmarks,
tests or C sources, one compiled ring with no RUNPATH), and child processes cannot import a
checkout. Either way: one version, the entry points, and nothing shipped imports dev tooling.
No build happens here (scripts/wheel.py does that); each test takes milliseconds.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

import ism_backend
import smcish
import smcish._ring
import smcish._version
from conftest import INSTALLED, PYTHON, ROOT, python_env

PACKAGES = {"smcish": Path(smcish.__file__).resolve().parent,
            "ism_backend": Path(ism_backend.__file__).resolve().parent}
SITE = sorted({Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")})

wheel_only = pytest.mark.skipif(not INSTALLED, reason="checks the installed wheel "
                                "(python3 scripts/wheel.py test)")
checkout_only = pytest.mark.skipif(INSTALLED, reason="checks the checkout's build configuration; "
                                   "the wheel it produced is checked by the wheel-mode tests")


def shipped_sources():
    """(module path relative to its package's parent, parsed tree) for every .py we ship."""
    for name, pkg in PACKAGES.items():
        for path in sorted(pkg.rglob("*.py")):
            if name == "smcish" and path.relative_to(pkg).parts[0] == "_cffi":
                continue        # build input (the checkout has it, the wheel does not)
            yield path.relative_to(pkg.parent), ast.parse(path.read_text(), str(path))


def distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("smcish")
    except importlib.metadata.PackageNotFoundError:
        if INSTALLED:
            raise
        pytest.skip("smcish is not installed (pip install -e '.[test,integration]')")


# ------------------------------------------------------------------------------- both modes

def test_the_version_is_written_once():
    assert smcish.__version__ == smcish._version.__version__
    assert smcish.__version__ == distribution().version
    assignments = [str(path) for path, tree in shipped_sources()
                   for node in ast.walk(tree)
                   if isinstance(node, (ast.Assign, ast.AnnAssign))
                   and any(isinstance(t, ast.Name) and t.id == "__version__"
                           for t in (node.targets if isinstance(node, ast.Assign)
                                     else [node.target]))]
    assert assignments == [str(Path("smcish", "_version.py"))], assignments


def test_the_entry_points_are_registered():
    points = {(ep.group, ep.name): ep.value for ep in distribution().entry_points}
    assert points[("console_scripts", "ismd")] == "ism_backend.daemon:main"
    assert points[("console_scripts", "smcish")] == "smcish.__main__:main"
    assert points[("pytest11", "smcish")] == "smcish.pytest_plugin"


def test_nothing_shipped_imports_dev_tooling_or_build_input():
    """benchmarks/ and tests/ are not in the wheel, nor is smcish._cffi (the C sources and the
    cffi builder): no shipped module may import them."""
    offenders = []
    for path, tree in shipped_sources():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            offenders += [f"{path}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in ("benchmarks", "tests")
                          or n.startswith("smcish._cffi")]
    assert not offenders, offenders


# ------------------------------------------------------------------------------ the checkout

@checkout_only
def test_the_wheel_config_lists_exactly_the_runtime_packages():
    config = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())
    tool = config["tool"]["setuptools"]
    # Every package directory of the two trees, but the build input.
    found = sorted(".".join(init.parent.relative_to(ROOT).parts)
                   for name in PACKAGES for init in (Path(ROOT) / name).rglob("__init__.py")
                   if "__pycache__" not in init.parts)
    assert found == ["ism_backend", "smcish", "smcish._cffi"]
    assert sorted(tool["packages"]) == ["ism_backend", "smcish"]      # no benchmarks, no _cffi
    assert tool["include-package-data"] is False    # MANIFEST.in must not leak into the wheel
    assert tool["package-data"] == {name: ["py.typed", "*.pyi"] for name in PACKAGES}
    for name in PACKAGES:
        assert (Path(ROOT) / name / "py.typed").is_file()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert tool["dynamic"]["version"] == {"attr": "smcish._version.__version__"}


@checkout_only
def test_the_sdist_carries_the_ring_sources_and_the_builder():
    root = Path(ROOT)
    setup = (root / "setup.py").read_text()
    assert 'cffi_modules=["smcish/_cffi/build_ring.py:ffibuilder"]' in setup
    listed, grafted = set(), set()
    for line in (root / "MANIFEST.in").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0] == "include":
            listed.update(words[1:])
        elif words and words[0] == "graft":
            grafted.update(words[1:])
    for path in ("smcish/_cffi/build_ring.py", "smcish/_cffi/ring.c", "smcish/_cffi/ring.h",
                 "smcish/py.typed", "ism_backend/py.typed"):
        assert path in listed, f"MANIFEST.in does not include {path}"
    missing = sorted(p for p in listed if not (root / p).is_file())
    assert not missing, f"MANIFEST.in lists files that do not exist: {missing}"
    # the rest of the source release: the suite, what it runs, and the build/test script
    assert {"tests", "examples", "benchmarks", "docs", "scripts"} <= grafted, grafted


# --------------------------------------------------------------------------- the wheel, installed

def _in_site(path: str | Path) -> bool:
    path = Path(path).resolve()
    return any(path.is_relative_to(site) for site in SITE)


def _elf_dynamic(path: Path) -> tuple[list[str], list[str]]:
    """(DT_NEEDED names, DT_RPATH + DT_RUNPATH values) of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    dynamic = next(s for s in segments if s[0] == 2)                       # PT_DYNAMIC

    def file_offset(vaddr: int) -> int:                                    # through PT_LOAD
        seg = next(s for s in segments if s[0] == 1 and s[3] <= vaddr < s[3] + s[5])
        return vaddr - seg[3] + seg[2]

    entries = []
    for off in range(dynamic[2], dynamic[2] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, val))
    strtab = file_offset(next(v for t, v in entries if t == 5))            # DT_STRTAB

    def string(at: int) -> str:
        return data[strtab + at: data.index(b"\0", strtab + at)].decode()

    return ([string(v) for t, v in entries if t == 1],                    # DT_NEEDED
            [string(v) for t, v in entries if t in (15, 29)])             # DT_RPATH, DT_RUNPATH


@wheel_only
def test_the_packages_under_test_are_the_installed_wheel():
    assert sys.prefix != sys.base_prefix
    for module in (smcish, smcish._ring, ism_backend):
        assert _in_site(module.__file__), (module.__name__, module.__file__, SITE)
    assert _in_site(distribution().locate_file("smcish/__init__.py"))
    for name in PACKAGES:
        assert not (Path(ROOT) / name).exists(), f"the test root holds {name}/"


@wheel_only
def test_the_installed_files_are_the_wheels_and_only_those():
    dist = distribution()
    files = [str(f) for f in dist.files]
    inside = [f for f in files if not f.startswith("..")]            # (../../../bin/ scripts)
    tops = {f.split("/")[0] for f in inside}
    assert tops == {"smcish", "ism_backend", f"smcish-{dist.version}.dist-info"}, tops
    assert "smcish/py.typed" in files and "ism_backend/py.typed" in files
    for pkg in PACKAGES.values():
        assert (pkg / "py.typed").is_file()
    assert not [f for f in inside if f.startswith("smcish/_cffi/")
                or f.endswith((".c", ".h", ".o"))], inside
    rings = [f for f in inside if f.startswith("smcish/_ring") and f.endswith(".so")]
    assert len(rings) == 1, rings
    assert Path(smcish._ring.__file__).resolve() == Path(dist.locate_file(rings[0])).resolve()
    # every file RECORD lists is there (pip installed exactly the wheel)
    assert all(Path(dist.locate_file(f)).exists() for f in inside)
    # the tag auditwheel gave it
    wheel_tags = [line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines()
                  if line.startswith("Tag:")]
    assert wheel_tags and all("manylinux" in tag for tag in wheel_tags), wheel_tags
    assert "Root-Is-Purelib: false" in dist.read_text("WHEEL")


@wheel_only
def test_the_compiled_ring_needs_libc_only_and_no_build_host_path():
    needed, rpaths = _elf_dynamic(Path(smcish._ring.__file__))
    assert needed == ["libc.so.6"], needed
    assert rpaths == [], rpaths


@wheel_only
def test_child_processes_import_the_installed_wheel_and_nothing_else(tmp_path):
    # What the tests' children get (the test root first on PYTHONPATH) imports from site-packages.
    script = ("import json, smcish, ism_backend, smcish._ring as r; print(json.dumps("
              "[smcish.__file__, ism_backend.__file__, r.__file__]))")
    proc = subprocess.run([PYTHON, "-c", script], env=python_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all(_in_site(p) for p in json.loads(proc.stdout)), proc.stdout
    # A checkout-like smcish/ ahead of site-packages is refused, not imported.
    fake = tmp_path / "smcish"
    fake.mkdir()
    (fake / "__init__.py").write_text("print('the fake smcish was imported')\n")
    proc = subprocess.run([PYTHON, "-c", "import smcish"], capture_output=True, text=True,
                          env=python_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"),
                          cwd=tmp_path, timeout=60)
    assert proc.returncode != 0 and "fake smcish was imported" not in proc.stdout, proc
    assert "_smcish_wheel_guard" in proc.stderr and str(fake) in proc.stderr, proc.stderr
