#!/usr/bin/env python3
"""Write the API reference, docs/api/, from the docstrings. Standard library only.

    python scripts/gen_api_docs.py             # (re)write docs/api/ of this checkout
    python scripts/gen_api_docs.py --out DIR   # write the pages into DIR instead
    python scripts/gen_api_docs.py --check     # exit 1 if docs/api/ differs from what it would write

One page per public module (PAGES) and an index, docs/api/README.md. A page documents the
module's public names: its ``__all__``, or where it has none, the classes and functions defined in
it and its UPPER_CASE constants, none starting with an underscore. Each name is written out in full
once, on the page of the module that defines it; a package's page lists everything its
``__all__`` exports, with a link to that entry (and holds in full the names whose defining module
has no page of its own). For each name: its signature (annotations as written in the source), its
own docstring (``inspect.cleandoc``; never one inherited from the standard library), and for a
class its public methods and properties.

The output depends only on the code: names sorted where their order means nothing, no memory
addresses, no paths of the machine that ran it. tests/test_api_docs.py checks that the committed
pages are what this script writes.
"""

from __future__ import annotations

import argparse
import ast
import enum
import filecmp
import importlib
import inspect
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api"
COMMAND = "python scripts/gen_api_docs.py"

#: The public modules, each with what it is for (the index's second column). The packages'
#: ``__all__`` are their public face; the modules are those README.md and docs/ present to users.
PAGES: dict[str, str] = {
    "ism_backend": "the ISM device: selecting one (open_device, get_device), its interface, its errors",
    "smcish": "the package: every name it exports, and in full the entry points defined elsewhere",
    "smcish.config": "Config: settings from the environment, a Config object or keywords",
    "smcish.errors": "the exceptions smcish raises",
    "smcish.metrics": "Prometheus text and JSON renderings of this process's counters",
    "smcish.policy": "the acceleration policy: which connections try shared memory (docs/policy.md)",
    "smcish.run": "transparent mode for unchanged programs (python -m smcish run)",
    "smcish.stats": "this process's counters and the fallback log's settings",
    "smcish.streams": "open_connection and start_server, and the stream reader they use",
    "smcish.transport": "SmcTransport and SmcInfo (get_extra_info(\"smcish\"))",
    "smcish.zerocopy": "ZeroCopyProtocol and send_buffer (docs/design.md section 7.3)",
}
#: Public-looking names of modules without ``__all__`` that only smcish's own modules call
#: (counting, hooks, tables behind the command line): left out of the pages.
INTERNAL: dict[str, frozenset[str]] = {
    "smcish.metrics": frozenset({"FAMILIES"}),
    "smcish.policy": frozenset({"decide", "note_ended", "note_outcome"}),
    "smcish.stats": frozenset({"connection_rows", "connections", "count", "count_fallback",
                               "group_closed", "log_fallback", "track"}),
    "smcish.transport": frozenset({"TransportState", "state_table", "transition_table"}),
}
PACKAGES = ("ism_backend", "smcish")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SIMPLE = (bool, int, float, str, bytes, type(None))


# --- text helpers --------------------------------------------------------------------------------

def scrub(text: str) -> str:
    """No memory addresses, no paths of this checkout or home directory."""
    text = _ADDRESS.sub("", text)
    for path, name in ((str(ROOT), "."), (os.path.expanduser("~"), "~")):
        if len(path) > 1:
            text = text.replace(path, name)
    return text


def own_doc(obj: Any) -> str:
    """``obj``'s own docstring, cleaned; never one inherited from a base class."""
    doc = getattr(obj, "__doc__", None)
    if isinstance(obj, type) and "__doc__" not in obj.__dict__:
        doc = None
    return scrub(inspect.cleandoc(doc)) if isinstance(doc, str) and doc.strip() else ""


_SECTION = re.compile(r"^(Args|Arguments|Attributes|Fields|Keyword Args|Raises|Returns|Yields|"
                      r"Note|Notes|Example|Examples|See Also):\s*$")
_ITEM = re.compile(r"^(?P<name>[^:`]{1,60}?): (?P<text>.*)$")
_PROSE_SECTIONS = ("Returns", "Yields", "Note", "Notes", "Example", "Examples", "See Also")


def markdown(doc: str) -> str:
    """A Google-style docstring as Markdown: ``Args:``, ``Raises:``... sections become a bold
    title and a list (their indented items would otherwise run together as one paragraph)."""
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        match = _SECTION.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        title = match.group(1)
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        trailing_blank = i < len(lines)
        if out and out[-1].strip():
            out.append("")
        out += [f"**{title}:**", ""]
        indents = [len(b) - len(b.lstrip()) for b in body if b.strip()]
        base = min(indents) if indents else 0
        if title in _PROSE_SECTIONS:
            out.append(" ".join(b.strip() for b in body if b.strip()))
        else:
            items: list[str] = []
            for b in body:
                if not b.strip():
                    continue
                if len(b) - len(b.lstrip()) == base or not items:
                    items.append(b.strip())
                else:
                    items[-1] += " " + b.strip()
            for item in items:
                m = _ITEM.match(item)
                if m:
                    out.append(f"- `{m.group('name')}`: {m.group('text')}")
                else:
                    out.append(f"- {item}")
        if trailing_blank:
            out.append("")
    return "\n".join(out).strip()


def summary(doc: str) -> str:
    """The first paragraph, on one line."""
    first = doc.split("\n\n", 1)[0]
    return " ".join(first.split())


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def annotation(ann: Any) -> str:
    """An annotation as text: as written when it is a string (``from __future__ import
    annotations``), else a readable spelling of the object."""
    if isinstance(ann, str):
        return ann
    if isinstance(ann, typing.ForwardRef):
        return ann.__forward_arg__
    if ann is type(None) or ann is None:
        return "None"
    if isinstance(ann, type) and not isinstance(ann, types.GenericAlias):
        if ann.__module__ == "builtins":
            return ann.__qualname__
        return f"{ann.__module__}.{ann.__qualname__}"
    return scrub(repr(ann).replace("typing.", ""))


def value_text(value: Any) -> str:
    """A default or constant: its repr when that is plain data, else what it is."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, _SIMPLE) or (isinstance(value, (tuple, frozenset, list))
                                      and all(isinstance(v, _SIMPLE + (enum.Enum,)) for v in value)):
        if isinstance(value, frozenset):
            inner = ", ".join(sorted(value_text(v) for v in value))
            return f"frozenset({{{inner}}})" if value else "frozenset()"
        if isinstance(value, (tuple, list)) and any(isinstance(v, enum.Enum) for v in value):
            inner = ", ".join(value_text(v) for v in value)
            return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
        text = repr(value)
        return scrub(text) if len(text) <= 200 else f"<{type(value).__name__} of {len(text)} characters>"
    if isinstance(value, dict):
        return f"<dict of {len(value)} entries>"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} entries>"
    if callable(value):
        return f"<{getattr(value, '__qualname__', type(value).__name__)}>"
    return f"<{type(value).__name__}>"


def signature(obj: Any, *, skip_first: bool = False) -> str | None:
    """``(params) -> return`` with annotations as written, or None if there is none to show."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if skip_first and params and params[0].kind in (params[0].POSITIONAL_ONLY,
                                                    params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]
    parts: list[str] = []
    star_done = False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star_done = "*" + p.name, True
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + p.name
        if p.annotation is not p.empty:
            text += ": " + annotation(p.annotation)
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + value_text(p.default)
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params)
                                            or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    out = "(" + ", ".join(parts) + ")"
    if sig.return_annotation is not sig.empty:
        out += " -> " + annotation(sig.return_annotation)
    return out


# --- what a page documents -----------------------------------------------------------------------

def defined_in(obj: Any, module: types.ModuleType) -> bool:
    return getattr(obj, "__module__", None) == module.__name__


def constant_comments(module: types.ModuleType) -> dict[str, str]:
    """The comment a module writes about each top-level assignment: the block of ``#`` lines
    right above it, else a ``#`` comment at the end of its line."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, ast.AnnAssign) else None)
        if not isinstance(target, ast.Name):
            continue
        above: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].lstrip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#:").strip())
            i -= 1
        if above:
            out[target.id] = " ".join(above)
            continue
        first = lines[node.lineno - 1]
        if "  #" in first and node.end_lineno == node.lineno:
            out[target.id] = first.split("  #", 1)[1].lstrip("#: ").strip()
    return out


def top_level_constants(module: types.ModuleType) -> list[str]:
    """UPPER_CASE names a module assigns at its top level (read from its source)."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return []
    names: set[str] = set()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_"):
                names.add(target.id)
    return sorted(names)


def public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return sorted(set(names))
    found = {name for name, obj in vars(module).items()
             if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
             and defined_in(obj, module)}
    found.update(top_level_constants(module))
    return sorted(found - INTERNAL.get(module.__name__, frozenset()))


def home(obj: Any, page: str) -> str:
    """The page that documents ``obj`` in full: its defining module's, else ``page``."""
    module = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and isinstance(module, str) and module in PAGES:
        return module
    return page


def kind_of(obj: Any) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.iscoroutinefunction(obj):
        return "coroutine function"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "constant"


SECTIONS = (("class", "Classes"), ("exception", "Exceptions"), ("coroutine function", "Functions"),
            ("function", "Functions"), ("constant", "Constants"))


def qualified(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# --- rendering -----------------------------------------------------------------------------------

def code(text: str) -> list[str]:
    return ["```python", text, "```", ""]


def doc_block(doc: str, missing: str = "no docstring") -> list[str]:
    return [markdown(doc) if doc else f"*{missing}*", ""]


def function_lines(prefix: str, func: Any, *, skip_first: bool = False) -> list[str]:
    sig = signature(func, skip_first=skip_first) or "(...)"
    word = "async def" if inspect.iscoroutinefunction(func) else "def"
    return code(f"{word} {prefix}{sig}")


def member_entries(cls: type) -> Iterator[tuple[str, list[str]]]:
    """The public methods and properties a class defines itself, sorted by name."""
    for name in sorted(cls.__dict__):
        if name.startswith("_"):
            continue
        raw = cls.__dict__[name]
        heading = f"`{cls.__name__}.{name}`"
        if isinstance(raw, property):
            fget = raw.fget
            ret = None
            if fget is not None:
                ann = inspect.signature(fget).return_annotation
                ret = None if ann is inspect.Signature.empty else annotation(ann)
            kind = "property" if raw.fset is None else "property (settable)"
            lines = code(f"{name}: {ret}" if ret else name)
            lines[0:0] = [f"*{kind}*", ""]
            yield heading, lines + doc_block(own_doc(raw) or own_doc(fget), _inherited(cls, name))
        elif isinstance(raw, (classmethod, staticmethod)):
            func = raw.__func__
            decorator = "@classmethod" if isinstance(raw, classmethod) else "@staticmethod"
            sig = signature(func, skip_first=isinstance(raw, classmethod)) or "(...)"
            word = "async def" if inspect.iscoroutinefunction(func) else "def"
            yield heading, code(f"{decorator}\n{word} {name}{sig}") + doc_block(
                own_doc(func), _inherited(cls, name))
        elif inspect.isfunction(raw):
            yield heading, function_lines(name, raw, skip_first=True) + doc_block(
                own_doc(raw), _inherited(cls, name))


def _inherited(cls: type, name: str) -> str:
    """What to say for a member without a docstring of its own."""
    for base in cls.__mro__[1:]:
        if name in base.__dict__:
            return f"no docstring of its own; overrides `{qualified(base)}.{name}`"
    return "no docstring"


def enum_lines(cls: type[enum.Enum]) -> list[str]:
    lines = ["| member | value | description |", "|---|---|---|"]
    for member in cls:   # definition order: meaningful
        description = getattr(member, "description", "")
        description = description if isinstance(description, str) else ""
        lines.append(f"| `{member.name}` | `{value_text(member.value)}` | {description} |")
    return lines + [""]


def class_lines(name: str, cls: type) -> list[str]:
    bases = ", ".join(qualified(b) for b in cls.__bases__ if b is not object)
    lines = code(f"class {name}({bases})" if bases else f"class {name}")
    init_sig = None
    if not issubclass(cls, enum.Enum):
        own_init = any("__init__" in k.__dict__ or "__new__" in k.__dict__
                       for k in cls.__mro__ if k.__module__.split(".")[0] in PACKAGES)
        if own_init or "__dataclass_fields__" in cls.__dict__ or hasattr(cls, "_fields"):
            init_sig = signature(cls)
    if init_sig:
        lines += ["Constructor:", ""] + code(f"{name}{init_sig}")
    lines += doc_block(own_doc(cls))
    if issubclass(cls, enum.Enum):
        lines += enum_lines(cls)
    members = list(member_entries(cls))
    if members:
        lines += [f"### Methods and properties of `{name}`", ""]
        for heading, body in members:
            lines += [f"#### {heading}", ""] + body
    return lines


def entry_lines(name: str, obj: Any, comment: str = "") -> list[str]:
    if inspect.isclass(obj):
        return class_lines(name, obj)
    if callable(obj) and not isinstance(obj, _SIMPLE):
        return function_lines(name, obj) + doc_block(own_doc(obj))
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, _SIMPLE)
                                             for k, v in obj.items()):
        lines = code(f"{name}: dict  # {len(obj)} entries") + ([scrub(comment), ""] if comment else [])
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {scrub(str(v)).replace('|', chr(92) + '|')} |" for k, v in obj.items()]
        return lines + [""]
    return code(f"{name} = {value_text(obj)}") + ([scrub(comment), ""] if comment else [])


def shadow_note(module: types.ModuleType) -> list[str]:
    """A module hidden behind a package attribute of the same name (``smcish.stats``)."""
    package, _, last = module.__name__.rpartition(".")
    if not package:
        return []
    attr = getattr(sys.modules[package], last, None)
    if attr is None or attr is module:
        return []
    note = (f"Note: the attribute `{module.__name__}` of the imported package is the "
            f"{kind_of(attr)} `{last}`, not this module; import this module's names with "
            f"`from {module.__name__} import NAME`.")
    return [note, ""]


def page(modname: str) -> str:
    module = importlib.import_module(modname)
    comments = constant_comments(module)
    entries: dict[str, list[tuple[str, Any, str]]] = {}
    for name in public_names(module):
        if not hasattr(module, name):
            continue
        obj = getattr(module, name)
        entries.setdefault(kind_of(obj), []).append((name, obj, home(obj, modname)))
    lines = [f"# `{modname}`", "",
             f"<!-- Generated by {COMMAND} from the docstrings: do not edit, run it again. -->", ""]
    lines += doc_block(own_doc(module), "no module docstring")
    lines += shadow_note(module)
    if modname == "smcish":
        lines += ["Version: `smcish.__version__`, written once, in `smcish/_version.py`.", ""]
    if not entries:
        return "\n".join(lines).rstrip() + "\n"
    lines += ["## Contents", "", "| name | kind | summary |", "|---|---|---|"]
    sections: dict[str, list[tuple[str, Any, str]]] = {}
    for kind, title in SECTIONS:
        for name, obj, where in entries.get(kind, []):
            sections.setdefault(title, []).append((name, obj, where))
    for title in dict.fromkeys(t for _, t in SECTIONS):
        for name, obj, where in sorted(sections.get(title, []), key=lambda e: e[0].lower()):
            link = f"#{slug(f'`{name}`')}" if where == modname else f"{where}.md#{slug(f'`{name}`')}"
            text = summary(own_doc(obj)) if (inspect.isclass(obj) or callable(obj)) else \
                scrub(comments.get(name, ""))
            if where != modname:
                text = (text + " " if text else "") + f"(in `{where}`)"
            text = text.replace("|", "\\|")
            lines.append(f"| [`{name}`]({link}) | {kind_of(obj)} | {text} |")
    lines.append("")
    for title in dict.fromkeys(t for _, t in SECTIONS):
        local = sorted(((n, o) for n, o, w in sections.get(title, []) if w == modname),
                       key=lambda e: e[0].lower())
        if not local:
            continue
        lines += [f"## {title}", ""]
        for name, obj in local:
            lines += [f"### `{name}`", ""] + entry_lines(name, obj, comments.get(name, ""))
    return scrub("\n".join(lines).rstrip() + "\n")


def index() -> str:
    lines = ["# API reference", "",
             f"<!-- Generated by {COMMAND} from the docstrings: do not edit, run it again. -->", "",
             "One page per public module, generated from the docstrings: signatures (annotations as "
             "written in the source), docstrings, and for classes their public methods and properties. "
             "Each name is written out in full once, on the page of the module that defines it; a "
             "package's page lists everything it exports and links there. Names that a module without "
             "`__all__` exposes only for smcish's own use (the generator's `INTERNAL` table) are left "
             "out. After changing a docstring "
             "or a signature, run `" + COMMAND + "` (`tests/test_api_docs.py` fails until the pages "
             "match the code).", "",
             "| module | what it is |", "|---|---|"]
    for modname in sorted(PAGES):
        lines.append(f"| [`{modname}`]({modname}.md) | {PAGES[modname]} |")
    see = ("How the pieces fit together: [../design.md](../design.md); the command line "
           "(`python -m smcish run|stat|demo|doctor`, `ismd`): [../../README.md](../../README.md) and "
           "[../operations.md](../operations.md).")
    lines += ["", see, ""]
    return "\n".join(lines)


def render() -> dict[str, str]:
    """{file name: content} of every page and the index."""
    files = {f"{modname}.md": page(modname) for modname in sorted(PAGES)}
    files["README.md"] = index()
    return files


def write(out: Path) -> list[str]:
    """Write the pages into ``out``, removing stale ``.md`` files there; returns the names."""
    files = render()
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.glob("*.md")):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT, help="directory to write (default docs/api/)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the pages in --out differ from the code's")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            names = write(Path(tmp))
            have = sorted(p.name for p in args.out.glob("*.md")) if args.out.is_dir() else []
            _, mismatch, errors = filecmp.cmpfiles(tmp, args.out, names, shallow=False)
            stale = sorted(set(have) - set(names))
            bad = sorted(mismatch + errors + stale)
        if bad:
            print(f"{args.out}: out of date: {', '.join(bad)}; run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    names = write(args.out)
    print(f"wrote {len(names)} pages to {args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
