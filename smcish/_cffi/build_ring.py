"""cffi API-mode builder for ``smcish._ring`` (the shared-memory ring in ring.c).

Used by setuptools through ``cffi_modules=["smcish/_cffi/build_ring.py:ffibuilder"]``; run
directly (``python smcish/_cffi/build_ring.py``) it compiles the extension in place next to
``smcish/ring.py`` for development.

Environment:
    SMCISH_RING_SANITIZE=1  build with ``-fsanitize=address,undefined -O1 -g`` (load the result
                            with LD_PRELOAD of libasan/libubsan; see docs/ring.md).
"""

import os
import pathlib
import re
import sys

from cffi import FFI  # type: ignore[import-untyped, unused-ignore]  # stubs: types-cffi, not required

HERE = pathlib.Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent.parent

_CDEF_RE = re.compile(r"/\* ---- cdef begin ---- \*/(.*?)/\* ---- cdef end ---- \*/", re.DOTALL)


def _cdef_from_header(header_path: pathlib.Path) -> str:
    """Return the cdef-able part of ring.h (between the cdef markers)."""
    match = _CDEF_RE.search(header_path.read_text())
    if match is None:
        raise RuntimeError(f"{header_path}: cdef markers not found")
    return match.group(1)


def _project_relative(path: pathlib.Path) -> str:
    # setuptools insists on paths relative to setup.py's directory (its cwd while building).
    rel = os.path.relpath(path, os.getcwd())
    return path.as_posix() if rel.startswith("..") else pathlib.PurePath(rel).as_posix()


def _compile_args() -> tuple[list[str], list[str]]:
    if os.environ.get("SMCISH_RING_SANITIZE") == "1":
        flags = ["-std=c11", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                 "-fno-sanitize-recover=undefined", "-O1", "-g"]
        return flags, ["-fsanitize=address,undefined"]
    return ["-O2", "-std=c11"], []


def make_builder() -> FFI:
    """A fresh FFI builder whose source paths are relative to the current directory."""
    compile_args, link_args = _compile_args()
    builder = FFI()
    builder.cdef(_cdef_from_header(HERE / "ring.h"))
    builder.set_source(
        "smcish._ring",
        '#include "ring.h"',
        sources=[_project_relative(HERE / "ring.c")],
        include_dirs=[_project_relative(HERE)],
        depends=[_project_relative(HERE / "ring.h")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    return builder


ffibuilder = make_builder()


def main() -> None:
    """Compile smcish/_ring*.so in place (development builds)."""
    os.chdir(PROJECT_ROOT)
    out = make_builder().compile(tmpdir=".", verbose="-q" not in sys.argv)
    for obj in ("smcish/_cffi/ring.o", "smcish/_ring.o"):  # keep the tree clean
        if os.path.exists(obj):
            os.unlink(obj)
    print(out)


if __name__ == "__main__":
    main()
