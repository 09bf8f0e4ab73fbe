"""Acceleration policy: which connections try shared memory (docs/policy.md).

Every connection asks ``decide(side, host, port)`` once before it claims shared memory (a client,
for each address it tries) or before a listener is advertised (a server, for each listening
socket). The answer is None (go ahead) or the ``DeclineReason`` it stays TCP for, which the
connection reports like any other fallback (``get_extra_info("smcish").reason``, ``stats()``,
the INFO log line with the remedy).

The order, first answer wins:

1. a Python callable set with ``smcish.set_policy(fn)``: ``fn(query)`` returns True (accelerate),
   False (TCP, ``DISABLED_BY_POLICY``) or None (no opinion);
2. the rules, in order: ``SMCISH_POLICY`` (inline), then the config file's ``[[policy.rules]]``;
   a rule matches on side, address range, port range and program; ``tcp`` answers
   ``DISABLED_BY_POLICY``, ``ism`` answers "go ahead" but still passes the learned check below;
3. the config file's ``default`` (``ism`` unless set);
4. learned: a destination whose set-ups kept falling back for a reason of the peer's (declined,
   no common version, not smcish after all, a stalled peer) ``decline_after`` times in a row is
   skipped for ``decline_ttl`` seconds (``LEARNED_DECLINE``); one whose shared-memory
   connections kept ending within ``short_lived_ms`` is skipped for ``short_lived_ttl`` seconds
   (``LEARNED_SHORT_LIVED``; off unless set: an smcish set-up costs more than TCP's, but on by
   default it would turn bursts of connections to TCP unasked; docs/policy.md). Both caches are
   bounded (``cache_size`` destinations, oldest dropped).

Rules are read once per value of ``SMCISH_POLICY``, ``SMCISH_CONFIG``, ``XDG_CONFIG_HOME`` and
``HOME`` (and again after ``set_policy(None)``); the config file is
``SMCISH_CONFIG`` or, if it exists, ``$XDG_CONFIG_HOME/smcish/config.toml``
(``~/.config/smcish/config.toml``). A malformed policy raises ``PolicyError`` (a ``ValueError``)
naming the file, rule and field, from the first connection or listener that reads it.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import ipaddress
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeAlias

from .clc import DeclineReason as R

log = logging.getLogger("smcish.policy")

ACTIONS = ("ism", "tcp")
SIDES = ("client", "server", "any")

# Fallback reasons that say something about the destination (the peer, or the path to it)
# rather than about this process: repeated, they make the destination skipped for a while.
# Resource refusals (NO_MEMORY, QUOTA, ATTACH_FAILED) are not learned: they pass as memory is
# freed, and the device refuses them quickly anyway.
LEARNABLE = frozenset((R.TIMEOUT, R.GID_MISMATCH, R.VERSION_MISMATCH, R.PROTOCOL_ERROR,
                       R.PEER_DECLINED, R.PEER_NOT_SMCISH))


Network: TypeAlias = "ipaddress.IPv4Network | ipaddress.IPv6Network"
Address: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"
Destination: TypeAlias = "tuple[str, int]"


class PolicyError(ValueError):
    """A policy (rules, config file, callable's answer) that cannot be used as written."""


class Query(NamedTuple):
    """What a policy callable is asked about one connection or listener.

    Attributes:
        side: ``"client"`` (a connection we open) or ``"server"`` (a listening socket).
        host: the destination address (client) or the listening address (server), numeric.
        port: the destination port (client) or the listening port (server).
        program: this process's program name (``smcish run``'s script or module, else
            ``sys.argv[0]``'s base name).
    """

    side: str
    host: str
    port: int
    program: str


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule. Empty ``networks`` / ``ports`` / ``programs`` match anything.

    Attributes:
        action: ``"ism"`` or ``"tcp"``.
        side: ``"client"``, ``"server"`` or ``"any"``.
        networks: address ranges (``ipaddress`` networks).
        ports: inclusive port ranges ``(low, high)``.
        programs: shell-style patterns matched against the program name.
        origin: where the rule was written (for messages and ``describe()``).
    """

    action: str
    side: str = "any"
    networks: tuple[Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    programs: tuple[str, ...] = ()
    origin: str = ""

    def matches(self, side: str, addr: Address | None, port: int, program: str) -> bool:
        """Does this rule apply to ``side`` (client/server), address ``addr`` (None: not an
        IP address, matched only by rules without ``address``), ``port`` and ``program``?"""
        if self.side != "any" and self.side != side:
            return False
        if self.ports and not any(low <= port <= high for low, high in self.ports):
            return False
        if self.networks and (addr is None or not any(addr in net for net in self.networks
                                                      if net.version == addr.version)):
            return False
        return not self.programs or any(fnmatch.fnmatchcase(program, pat) for pat in self.programs)

    def describe(self) -> str:
        """The rule in ``SMCISH_POLICY`` syntax, e.g. ``tcp side=server port=8000-8999``."""
        parts = [self.action]
        if self.side != "any":
            parts.append(f"side={self.side}")
        if self.networks:
            parts.append("address=" + ",".join(str(n) for n in self.networks))
        if self.ports:
            parts.append("port=" + ",".join(str(lo) if lo == hi else f"{lo}-{hi}"
                                            for lo, hi in self.ports))
        if self.programs:
            parts.append("program=" + ",".join(self.programs))
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Rules and learned-rule settings (``docs/policy.md``).

    Attributes:
        rules: tried in order; the first that matches decides.
        default: ``"ism"`` or ``"tcp"`` when no rule matches.
        decline_after: set-ups to one destination falling back for a reason of the peer's, in
            a row, before it is skipped (0: never learn).
        decline_ttl: seconds such a destination is skipped.
        short_lived_ms: a shared-memory connection that ends within this many milliseconds is
            short-lived (0: off).
        short_lived_count: short-lived connections in a row to one destination before it is
            skipped.
        short_lived_ttl: seconds such a destination is skipped.
        cache_size: destinations remembered by each learned rule (oldest dropped).
        source: where the policy came from.
    """

    rules: tuple[Rule, ...] = ()
    default: str = "ism"
    decline_after: int = 3
    decline_ttl: float = 10.0
    short_lived_ms: float = 0.0
    short_lived_count: int = 16
    short_lived_ttl: float = 30.0
    cache_size: int = 1024
    source: str = "defaults"

    def __post_init__(self) -> None:
        if self.default not in ACTIONS:
            raise PolicyError(f"{self.source}: default must be one of {ACTIONS}, not {self.default!r}")
        for name in ("decline_after", "short_lived_count", "cache_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PolicyError(f"{self.source}: {name} must be an integer >= 0, not {value!r}")
        for name in ("decline_ttl", "short_lived_ms", "short_lived_ttl"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
                    or value != value or value == float("inf")):
                raise PolicyError(f"{self.source}: {name} must be a number >= 0, not {value!r}")
        if self.cache_size < 1:
            raise PolicyError(f"{self.source}: cache_size must be >= 1")


# --------------------------------------------------------------------------- parsing

def _networks(values: Iterable[Any], where: str) -> tuple[Network, ...]:
    out = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise PolicyError(f"{where}: address must be a string like '10.0.0.0/8', not {value!r}")
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise PolicyError(f"{where}: address {value!r}: {exc}") from None
    return tuple(out)


def _ports(values: Iterable[Any], where: str) -> tuple[tuple[int, int], ...]:
    out = []
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, str) and value.strip():
            text = value.strip()
            low_text, dash, high_text = text.partition("-")
            try:
                low = int(low_text)
                high = int(high_text) if dash else low
            except ValueError:
                raise PolicyError(f"{where}: port {value!r} is not a port or a range like "
                                  f"'8000-8999'") from None
        else:
            raise PolicyError(f"{where}: port must be an integer or a range string, not {value!r}")
        if not 0 <= low <= high <= 65535:
            raise PolicyError(f"{where}: port range {value!r} is not within 0-65535 (low <= high)")
        out.append((low, high))
    return tuple(out)


def _programs(values: Iterable[Any], where: str) -> tuple[str, ...]:
    out = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise PolicyError(f"{where}: program must be a non-empty string, not {value!r}")
        out.append(value)
    return tuple(out)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def make_rule(action: Any, *, side: Any = "any", address: Any = (), port: Any = (),
              program: Any = (), origin: str = "rule") -> Rule:
    """Build a checked ``Rule``; ``address``, ``port``, ``program`` take one value or a list."""
    if action not in ACTIONS:
        raise PolicyError(f"{origin}: action must be one of {ACTIONS}, not {action!r}")
    if side not in SIDES:
        raise PolicyError(f"{origin}: side must be one of {SIDES}, not {side!r}")
    return Rule(action, side, _networks(_as_list(address), origin), _ports(_as_list(port), origin),
                _programs(_as_list(program), origin), origin)


_INLINE_KEYS = {"side": "side", "address": "address", "addr": "address", "dst": "address",
                "port": "port", "program": "program"}


def parse_rules(text: str, origin: str = "SMCISH_POLICY") -> tuple[Rule, ...]:
    """Parse inline rules: ``ACTION [key=value[,value...]]...`` separated by ``;`` or newlines.

    Keys: ``side`` (client | server | any), ``address`` (alias ``dst``), ``port`` (numbers or
    ranges ``low-high``), ``program`` (shell patterns). Example:
    ``tcp port=5432,6379; tcp address=10.0.0.0/8; ism side=server port=8000-8999``.
    """
    rules: list[Rule] = []
    for chunk in text.replace("\n", ";").split(";"):
        words = chunk.split()
        if not words:
            continue
        where = f"{origin} rule {len(rules) + 1} ({chunk.strip()!r})"
        fields: dict[str, Any] = {}
        for word in words[1:]:
            key, eq, value = word.partition("=")
            name = _INLINE_KEYS.get(key.lower())
            if not eq or name is None:
                raise PolicyError(f"{where}: {word!r} is not key=value with key one of "
                                  f"side, address, port, program")
            if name in fields:
                raise PolicyError(f"{where}: {key} given twice")
            items = [item for item in value.split(",") if item]
            fields[name] = items[0] if name == "side" and len(items) == 1 else items
        rule = make_rule(words[0].lower(), origin=where, **fields)
        rules.append(dataclasses.replace(rule, origin=f"{origin} rule {len(rules) + 1}"))
    return tuple(rules)


_POLICY_KEYS = ("default", "decline_after", "decline_ttl", "short_lived_ms", "short_lived_count",
                "short_lived_ttl", "cache_size")
_RULE_KEYS = ("action", "side", "address", "port", "program")


def from_toml(data: dict[str, Any], source: str) -> Policy:
    """A Policy from a parsed TOML document's ``[policy]`` table."""
    table = data.get("policy", {})
    if not isinstance(table, dict):
        raise PolicyError(f"{source}: [policy] must be a table")
    unknown = set(table) - set(_POLICY_KEYS) - {"rules"}
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) in [policy]: {', '.join(sorted(unknown))} "
                          f"(known: {', '.join((*_POLICY_KEYS, 'rules'))})")
    raw_rules = table.get("rules", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{source}: policy.rules must be an array of tables ([[policy.rules]])")
    rules = []
    for index, raw in enumerate(raw_rules, 1):
        where = f"{source} [[policy.rules]] #{index}"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: must be a table")
        unknown = set(raw) - set(_RULE_KEYS)
        if unknown:
            raise PolicyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(_RULE_KEYS)})")
        if "action" not in raw:
            raise PolicyError(f"{where}: needs action = \"ism\" or \"tcp\"")
        rules.append(make_rule(raw["action"], side=raw.get("side", "any"),
                               address=raw.get("address", ()), port=raw.get("port", ()),
                               program=raw.get("program", ()), origin=where))
    settings = {key: table[key] for key in _POLICY_KEYS if key in table}
    return Policy(rules=tuple(rules), source=source, **settings)


def _check_file(path: str) -> None:
    """Refuse a config file another user could have written (it decides where our bytes go)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise PolicyError(f"{path}: not a regular file")
    if st.st_uid not in (os.geteuid(), 0):
        raise PolicyError(f"{path}: owned by uid {st.st_uid}, not by this user or root")
    if st.st_mode & 0o022:
        raise PolicyError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def load(path: str) -> Policy:
    """Read a TOML config file's ``[policy]`` (docs/policy.md)."""
    import tomllib

    try:
        _check_file(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise PolicyError(f"cannot read the smcish config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    return from_toml(data, path)


def default_path() -> str:
    """The config file read when ``SMCISH_CONFIG`` is not set (if it exists)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "smcish", "config.toml")


def from_env() -> Policy:
    """The policy the environment and the config file describe (see the module docstring)."""
    explicit = os.environ.get("SMCISH_CONFIG") or None
    path = explicit
    if path is None:
        candidate = default_path()
        path = candidate if os.path.exists(candidate) else None
    base = load(path) if path is not None else Policy()
    inline = os.environ.get("SMCISH_POLICY", "")
    if inline.strip():
        rules = parse_rules(inline)
        source = f"SMCISH_POLICY + {base.source}" if path else "SMCISH_POLICY"
        base = dataclasses.replace(base, rules=rules + base.rules, source=source)
    return base


# --------------------------------------------------------------------------- the process's state

_ENV_NAMES = ("SMCISH_POLICY", "SMCISH_CONFIG", "XDG_CONFIG_HOME", "HOME")
_ENV_KEYS = tuple(os.environ.encodekey(name) for name in _ENV_NAMES)
_lock = threading.Lock()
_env_policy: tuple[tuple[object, ...], Policy] | None = None     # (the variables it was read from, policy)
_override: Policy | None = None
_hook: Callable[[Query], Any] | None = None
_program: str | None = None
# Learned state: destination (host, port) -> ...
_strikes: collections.OrderedDict[Destination, tuple[int, float]] = collections.OrderedDict()
_short: collections.OrderedDict[Destination, tuple[int, float]] = collections.OrderedDict()
_skipped: collections.OrderedDict[Destination, tuple[float, R]] = collections.OrderedDict()
_hook_errors = 0
# The short-lived rule is on (set when a policy is read): only then do client connections note
# when they start (transport._learn_established).
short_lived_on = False


def set_policy(policy: Policy | Callable[[Query], Any] | None) -> None:
    """Set this process's policy.

    Args:
        policy: a ``Policy`` (replaces what the environment and config file say), a callable
            ``fn(query: Query) -> True | False | None`` consulted before the rules (True:
            accelerate, False: TCP with ``DISABLED_BY_POLICY``, None: ask the rules), or None
            (back to the environment and config file, read again; no callable). Learned
            entries are kept.
    """
    global _override, _hook, _env_policy, _hook_errors
    if policy is None:
        _override = None
        _hook = None
        _env_policy = None          # read the environment and the config file again
    elif isinstance(policy, Policy):
        _override = policy
    elif callable(policy):
        _hook = policy
        _hook_errors = 0            # its first errors are logged in full
    else:
        raise TypeError(f"set_policy() takes a Policy, a callable or None, not {type(policy).__name__}")
    _refresh_flags(_override)      # (without one: when the environment's is read, not now)


def _refresh_flags(policy: Policy | None) -> None:
    global short_lived_on
    short_lived_on = (policy is not None and policy.short_lived_ms > 0
                      and policy.short_lived_count > 0)


def set_program(name: str | None) -> None:
    """Name this process for ``program`` rules (``smcish run`` names the script or module)."""
    global _program
    _program = name


def program() -> str:
    """This process's name for ``program`` rules (see ``set_program``)."""
    if _program is None:
        return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return _program


def current() -> Policy:
    """The policy in force: ``set_policy``'s, else the environment's (cached per its values)."""
    global _env_policy
    if _override is not None:
        return _override
    # (os.environ's own dict of encoded keys: Mapping.get costs a KeyError per unset name, and
    # this runs once per connection; as config.Config.current.)
    data = getattr(os.environ, "_data", None)
    if data is not None:
        k0, k1, k2, k3 = _ENV_KEYS
        get = data.get
        key: tuple[object, ...] = (get(k0), get(k1), get(k2), get(k3))
    else:  # pragma: no cover - another os.environ implementation
        key = tuple(map(os.environ.get, _ENV_NAMES))
    cached = _env_policy
    if cached is not None and cached[0] == key:
        return cached[1]
    policy = from_env()
    _env_policy = (key, policy)
    _refresh_flags(policy)
    return policy


def _address(host: Any) -> Address | None:
    if not isinstance(host, str):
        return None
    host = host.partition("%")[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _key(host: Any, port: Any) -> Destination:
    addr = _address(host)
    return (str(addr) if addr is not None else str(host), int(port))


def decide(side: str, host: Any, port: Any) -> R | None:
    """None: try shared memory; else the reason this connection or listener stays TCP."""
    policy = current()
    hook = _hook
    if hook is not None:
        answer = _ask(hook, Query(side, str(host), int(port), program()))
        if answer is False:
            return R.DISABLED_BY_POLICY
        if answer is True:
            return _learned(side, host, port)
    if policy.rules:
        action = _rule_action(policy, side, host, port)
        if action == "tcp":
            return R.DISABLED_BY_POLICY
        if action == "ism":
            return _learned(side, host, port)
    if policy.default == "tcp":
        return R.DISABLED_BY_POLICY
    return _learned(side, host, port) if _skipped else None


# The rules' answer per (side, host, port, program), for the policy it was computed with: parsing
# an address and testing networks costs microseconds, a dict lookup well under one.
_memo: dict[tuple[str, Any, Any, str], str | None] = {}
_memo_policy: Policy | None = None
_MEMO_MAX = 4096


def _rule_action(policy: Policy, side: str, host: Any, port: Any) -> str | None:
    """The action of the first rule matching, or None when none does."""
    global _memo_policy
    name = program()
    key = (side, host, port, name)
    if _memo_policy is policy:
        try:
            return _memo[key]
        except (KeyError, TypeError):       # (TypeError: an unhashable host; not cached)
            pass
    else:
        _memo.clear()
        _memo_policy = policy
    addr = _address(host)
    action = None
    for rule in policy.rules:
        if rule.matches(side, addr, int(port), name):
            action = rule.action
            break
    try:
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo[key] = action
    except TypeError:
        pass
    return action


def explain(side: str, host: Any, port: Any) -> tuple[R | None, str]:
    """``decide()``'s answer and what gave it, in words (``python -m smcish doctor``)."""
    policy = current()
    hook = _hook
    if hook is not None:
        answer = _ask(hook, Query(side, str(host), int(port), program()))
        if answer is False:
            return R.DISABLED_BY_POLICY, f"the set_policy() callable {hook!r} said TCP (or failed)"
        if answer is True:
            reason = _learned(side, host, port)
            return reason, _learned_text(reason, f"the set_policy() callable {hook!r} said shared memory")
    addr = _address(host)
    name = program()
    for rule in policy.rules:
        if rule.matches(side, addr, int(port), name):
            if rule.action == "tcp":
                return R.DISABLED_BY_POLICY, f"{rule.origin}: {rule.describe()}"
            reason = _learned(side, host, port)
            return reason, _learned_text(reason, f"{rule.origin}: {rule.describe()}")
    if policy.default == "tcp":
        return R.DISABLED_BY_POLICY, f"{policy.source}: default = \"tcp\" (no rule matched)"
    reason = _learned(side, host, port) if _skipped else None
    return reason, _learned_text(reason, f"no rule matched; default ism ({policy.source})")


def _learned_text(reason: R | None, why: str) -> str:
    if reason is None:
        return why
    return f"{why}, but learned: {reason.name} ({reason.description})"


def _ask(hook: Callable[[Query], Any], query: Query) -> Any:
    global _hook_errors
    try:
        answer = hook(query)
    except Exception:   # a broken policy never breaks a connection: TCP
        _hook_errors += 1
        if _hook_errors <= 3 or _hook_errors % 1000 == 0:
            log.exception("smcish: the policy callable %r failed for %s (error %d): the "
                          "connection stays TCP", hook, query, _hook_errors)
        return False
    if answer is not None and not isinstance(answer, bool):
        _hook_errors += 1
        if _hook_errors <= 3 or _hook_errors % 1000 == 0:
            log.error("smcish: the policy callable %r returned %r for %s, not True/False/None: "
                      "the connection stays TCP", hook, answer, query)
        return False
    return answer


def _learned(side: str, host: Any, port: Any) -> R | None:
    if side != "client" or not _skipped:
        return None
    key = _key(host, port)
    with _lock:
        entry = _skipped.get(key)
        if entry is None:
            return None
        if time.monotonic() >= entry[0]:
            del _skipped[key]
            return None
        return entry[1]


def _bump(table: collections.OrderedDict[Destination, tuple[int, float]], key: Destination, limit: int,
          window: float) -> int:
    """Count one more event for ``key``; a count whose last event is older than ``window``
    seconds starts again (a destination that misbehaved long ago is not held against now)."""
    now = time.monotonic()
    count, last = table.pop(key, (0, now))
    count = count + 1 if now - last <= window else 1
    table[key] = (count, now)
    while len(table) > limit:
        table.popitem(last=False)
    return count


def _skip(key: Destination, seconds: float, reason: R, limit: int) -> None:
    _skipped.pop(key, None)
    _skipped[key] = (time.monotonic() + seconds, reason)
    while len(_skipped) > limit:
        _skipped.popitem(last=False)
    log.info("smcish: connections to %s:%d skip shared memory for %.0f s (%s: %s)", key[0],
             key[1], seconds, reason.name, reason.description)


def note_outcome(peer: Any, reason: R | None) -> None:
    """A client set-up to ``peer`` ended: in shared memory (reason None) or TCP for ``reason``."""
    if not isinstance(peer, (tuple, list)) or len(peer) < 2:
        return
    if reason is None:
        if _strikes:
            with _lock:
                _strikes.pop(_key(peer[0], peer[1]), None)
        return
    if reason not in LEARNABLE:
        return
    try:
        policy = current()
    except PolicyError:
        return
    if policy.decline_after <= 0 or policy.decline_ttl <= 0:
        return
    key = _key(peer[0], peer[1])
    with _lock:
        if _bump(_strikes, key, policy.cache_size, policy.decline_ttl) >= policy.decline_after:
            _strikes.pop(key, None)
            _skip(key, policy.decline_ttl, R.LEARNED_DECLINE, policy.cache_size)


def note_ended(peer: Any, lifetime: float) -> None:
    """A client's shared-memory connection to ``peer`` ended after ``lifetime`` seconds."""
    if not isinstance(peer, (tuple, list)) or len(peer) < 2:
        return
    try:
        policy = current()
    except PolicyError:
        return
    if policy.short_lived_ms <= 0 or policy.short_lived_count <= 0:
        return
    key = _key(peer[0], peer[1])
    with _lock:
        if lifetime * 1000.0 >= policy.short_lived_ms:
            _short.pop(key, None)
            return
        if _bump(_short, key, policy.cache_size, policy.short_lived_ttl) >= policy.short_lived_count:
            _short.pop(key, None)
            _skip(key, policy.short_lived_ttl, R.LEARNED_SHORT_LIVED, policy.cache_size)


def learned() -> list[dict[str, Any]]:
    """The destinations skipped now: ``[{"host", "port", "reason", "seconds_left"}]``."""
    now = time.monotonic()
    with _lock:
        return [{"host": host, "port": port, "reason": reason.name,
                 "seconds_left": round(until - now, 3)}
                for (host, port), (until, reason) in _skipped.items() if until > now]


def forget() -> None:
    """Drop everything learned (tests; an operator after fixing a peer)."""
    with _lock:
        _strikes.clear()
        _short.clear()
        _skipped.clear()
