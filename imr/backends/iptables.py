"""Per-address REJECT rules in imr's own iptables chain, for IPv4 and IPv6.

Layout (the same for both address families):

    -A INPUT -j IMR                      inserted once, at position 1, by prepare()
    -A IMR -m conntrack ! --ctstate NEW -j RETURN            the guard, always first
    -A IMR -s 192.0.2.7/32 -p tcp -m multiport --dports 80,443 -j REJECT --reject-with ...
    -A IMR -s 203.0.113.0/24 -p tcp ...  a network block (admin only): one rule as well

The guard: a block refuses new connections only, never a reply to one of the
host's own outbound connections or a connection already open (as the nftables
and ipset backends do), and such packets leave the chain at its first rule
instead of walking every per-address rule. It is there from prepare() on, so
the kernel tracks connections before the first block: a connection first seen
mid-stream counts as new, and its packets would be refused.

A host runs one of two iptables flavours and mixing them is never right:

* nft: the Debian 12 default (iptables-nft). Every change is one
  `iptables-nft-restore --noflush` batch on stdin, which the kernel applies as
  one nf_tables transaction: all of it or nothing.
* legacy: the old x_tables kernel interface, driven through python-iptables
  (libiptc). All changes to a table go into one handle and one commit, under
  the xtables lock that the iptables tools themselves take.

IPv4 and IPv6 are separate tables, so a batch touching both is two commits;
if the second fails, the first is undone (best effort, logged if that fails too).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from imr.backends import base
from imr.backends.base import Backend, BackendError, Drift, Expected, KernelBlock, Slot
from imr.backends.xtables import (
    FLAVOUR_LABELS,
    PACKAGE_HINT,
    TOOL_TIMEOUT,
    Flavour,
    resolve_flavour,
    run_tool,
    trim,
)
from imr.config import FirewallConfig
from imr.core.addresses import Target

log = logging.getLogger("imr.backend")

Family = Literal[4, 6]
FAMILIES: tuple[Family, ...] = (4, 6)

XTABLES_LOCK_WAIT = 10.0  # seconds we wait for another iptables command to finish
DEFAULT_XTABLES_LOCKFILE = "/run/xtables.lock"


# ---------------------------------------------------------------------------
# What a rule looks like, shared by both flavours


@dataclass(frozen=True)
class RuleShape:
    """The match and verdict of every per-address rule, from the configuration."""

    protocol: str | None  # None: every protocol
    dports: str | None  # multiport list as iptables prints it, e.g. "80,25,8000:8080"
    reject_with: dict[int, str]  # by address family

    @classmethod
    def from_config(cls, config: FirewallConfig) -> RuleShape:
        protocol = None if config.protocol == "all" else config.protocol
        dports = ",".join(_canonical_port(spec) for spec in config.ports) or None
        return cls(protocol, dports, {4: config.reject_with_ipv4, 6: config.reject_with_ipv6})

    def tokens(self, address: Target) -> list[str]:
        """The rule in `iptables -S` form (without "-A CHAIN"), so it compares with a listing."""
        tokens = ["-s", _cidr(address)]
        if self.protocol:
            tokens += ["-p", self.protocol]
        if self.dports:
            tokens += ["-m", "multiport", "--dports", self.dports]
        return [*tokens, "-j", "REJECT", "--reject-with", self.reject_with[address.version]]


# The first rule of imr's chain: whatever is not a new connection leaves it at once.
GUARD = ["-m", "conntrack", "!", "--ctstate", "NEW", "-j", "RETURN"]
GUARD_TEXT = " ".join(GUARD)


def _canonical_port(spec: str) -> str:
    low, high = base.port_range(spec)
    return str(low) if low == high else f"{low}:{high}"  # as `iptables -S` prints it


def _cidr(target: Target) -> str:
    """A source as `iptables -S` prints it: an address with its full prefix, or the network."""
    if isinstance(target, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return f"{target}/{target.max_prefixlen}"
    return str(target)


def host_address(text: str) -> Target | None:
    """What a rule's source blocks: an address ("192.0.2.7/32", "192.0.2.7/255.255.255.255")
    or a network ("203.0.113.0/24", "2001:db8::/ffff:ffff::" from python-iptables); None for
    anything else (no source at all, a negated one, a mask with holes)."""
    address_text, _, mask = text.partition("/")
    try:
        address = ipaddress.ip_address(address_text)
        prefix: int
        if not mask:
            prefix = address.max_prefixlen
        elif mask.isdigit():
            prefix = int(mask)
        else:
            bits = int(ipaddress.ip_address(mask))
            prefix = bin(bits).count("1")
            if bits != ((1 << prefix) - 1) << (address.max_prefixlen - prefix):
                return None  # not a prefix
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    except ValueError:  # also "!192.0.2.7/32": a negated source is no block
        return None
    if network.prefixlen == network.max_prefixlen:
        return network.network_address
    return network if network.prefixlen > 0 else None  # "0.0.0.0/0": no source given


def _source_of(tokens: Sequence[str]) -> Target | None:
    for index, token in enumerate(tokens[:-1]):
        if token in ("-s", "--source"):
            if index and tokens[index - 1] == "!":
                return None
            return host_address(tokens[index + 1])
    return None


# ---------------------------------------------------------------------------
# Planning a change against the rules the kernel has now

R = TypeVar("R")  # a flavour's handle on one kernel rule


@dataclass
class _Change:
    """What one family's commit changed, so that a failure in the other family can undo it."""

    added: list[Target] = field(default_factory=list)
    removed: list[Target] = field(default_factory=list)


@dataclass
class _Plan(Generic[R]):
    delete: list[R] = field(default_factory=list)
    append: list[Target] = field(default_factory=list)
    change: _Change = field(default_factory=_Change)


def _plan(
    existing: Sequence[tuple[Target | None, R]],
    add: Sequence[Target],
    remove: Sequence[Target],
    is_wanted: Callable[[R, Target], bool],
) -> _Plan[R]:
    """Deletes and appends that make the chain block `add` and not `remove`.

    Only rules the kernel really has are deleted (deleting a missing rule would
    abort the whole batch). An address already blocked by a rule of the wanted
    shape keeps it; rules of another shape (ports changed in the configuration)
    and duplicates are replaced. An address in both lists ends up blocked.
    """
    by_source: dict[Target, list[R]] = {}
    for source, rule in existing:
        if source is not None:
            by_source.setdefault(source, []).append(rule)
    plan: _Plan[R] = _Plan()
    adding = dict.fromkeys(add)  # ordered and without repeats
    for address in dict.fromkeys(remove):
        if address in adding:
            continue
        if rules := by_source.get(address):
            plan.delete += rules
            plan.change.removed.append(address)
    for address in adding:
        rules = by_source.get(address, [])
        keep = next((rule for rule in rules if is_wanted(rule, address)), None)
        plan.delete += [rule for rule in rules if rule is not keep]
        if keep is None:
            plan.append.append(address)
            if not rules:
                plan.change.added.append(address)
    return plan


def _unique(addresses: Iterable[Target]) -> list[Target]:
    return list(dict.fromkeys(addresses))


# ---------------------------------------------------------------------------
# The two flavours behind one small interface, one address family per call


_SLOTS_OF: dict[Family, tuple[Slot, Slot]] = {4: ("v4", "net4"), 6: ("v6", "net6")}


@dataclass(frozen=True)
class _Survey:
    """One family's part of the drift check: cheap counts, no per-rule parsing."""

    chain: bool  # imr's chain exists
    rules: int  # rules in it, the guard not counted
    jumps: int  # jumps to it from INPUT
    guard: bool = False  # its first rule is the guard


class _Driver(ABC):
    flavour: Flavour

    def __init__(self, chain: str, shape: RuleShape) -> None:
        self.chain = chain
        self.shape = shape

    @abstractmethod
    def prepare(self, family: Family) -> None: ...

    @abstractmethod
    def apply(self, family: Family, add: Sequence[Target], remove: Sequence[Target]) -> _Change:
        """Creates the chain and jump first if they are missing and there is something to add."""

    @abstractmethod
    def replace_all(self, family: Family, addresses: Sequence[Target]) -> list[Target]:
        """Returns the addresses blocked before, for undoing."""

    @abstractmethod
    def installed(self, family: Family) -> list[Target]: ...

    @abstractmethod
    def teardown(self, family: Family) -> None: ...

    def survey(self, family: Family) -> _Survey:
        """Counted from the flavour's own `-S` listing: the C tool lists thousands of rules
        in milliseconds, where parsing each rule (the write path) costs far more."""
        tool = f"{'iptables' if family == 4 else 'ip6tables'}-{self.flavour}"
        chain = _NftDriver._run([tool, "-w", "10", "-S", self.chain])
        if chain.returncode != 0:
            table = _NftDriver._run([tool, "-w", "10", "-S"])
            if table.returncode == 0 and f"-N {self.chain}" not in table.stdout.splitlines():
                return _Survey(False, 0, 0)  # (iptables-nft calls a missing chain incompatible)
            raise BackendError(f"{tool} -S {self.chain} failed: {trim(chain.stderr)}")
        prefix = f"-A {self.chain} "
        rules = [line for line in chain.stdout.splitlines() if line.startswith(prefix)]
        guard = bool(rules) and rules[0] == prefix + GUARD_TEXT
        hooks = _NftDriver._run([tool, "-w", "10", "-S", "INPUT"])
        if hooks.returncode != 0:
            raise BackendError(f"{tool} -S INPUT failed: {trim(hooks.stderr)}")
        jumps = hooks.stdout.splitlines().count(f"-A INPUT -j {self.chain}")
        return _Survey(True, len(rules) - guard, jumps, guard)


class _NftDriver(_Driver):
    """iptables-nft: reads with `iptables-nft -S`, writes with one restore batch per call."""

    flavour: Flavour = "nft"

    def __init__(self, chain: str, shape: RuleShape) -> None:
        super().__init__(chain, shape)
        self.list_tools: dict[int, str] = {4: "iptables-nft", 6: "ip6tables-nft"}
        self.restore_tools: dict[int, str] = {4: "iptables-nft-restore", 6: "ip6tables-nft-restore"}
        missing = [
            tool
            for tool in (*self.list_tools.values(), *self.restore_tools.values())
            if shutil.which(tool) is None
        ]
        if missing:
            raise BackendError(f"{', '.join(missing)} not found: {PACKAGE_HINT}")

    def prepare(self, family: Family) -> None:
        lines = []
        rules = self._read_chain(family)
        if rules is None:
            lines.append(f"-N {self.chain}")
            rules = []
        guards = [text for text, tokens in rules if tokens == GUARD]
        if len(guards) != 1 or rules[0][1] != GUARD:
            lines += [f"-D {self.chain} {text}" for text in guards]
            lines.append(f"-I {self.chain} 1 {GUARD_TEXT}")
        jumps = self._count_jumps(family)
        if jumps != 1:
            # None, or several (someone duplicated it): a delete takes the first match, so drop
            # them all and insert one at the top again, in the same transaction.
            lines += [f"-D INPUT -j {self.chain}"] * jumps
            lines.append(f"-I INPUT 1 -j {self.chain}")
        if lines:
            self._commit(family, lines)

    def apply(self, family: Family, add: Sequence[Target], remove: Sequence[Target]) -> _Change:
        rules = self._read_chain(family)
        lines = []
        if rules is None:
            if not add:
                return _Change()
            log.warning("chain %s is missing (IPv%d); creating it again", self.chain, family)
            lines += [
                f"-N {self.chain}",
                f"-A {self.chain} {GUARD_TEXT}",
                f"-I INPUT 1 -j {self.chain}",
            ]
            rules = []
        plan = _plan(
            [(_source_of(tokens), text) for text, tokens in rules],
            add,
            remove,
            lambda text, address: shlex.split(text) == self.shape.tokens(address),
        )
        # Deleting by the kernel's own text removes exactly the listed rule, whatever its shape.
        lines += [f"-D {self.chain} {text}" for text in plan.delete]
        lines += [self._append_line(address) for address in plan.append]
        if lines:
            self._commit(family, lines)
        return plan.change

    def replace_all(self, family: Family, addresses: Sequence[Target]) -> list[Target]:
        rules = self._read_chain(family)
        if rules is None:
            if not addresses:
                return []
            lines = [f"-N {self.chain}", f"-I INPUT 1 -j {self.chain}"]
            previous: list[Target] = []
        else:
            lines = [f"-F {self.chain}"]
            previous = _sources(tokens for _, tokens in rules)
        lines.append(f"-A {self.chain} {GUARD_TEXT}")
        lines += [self._append_line(address) for address in _unique(addresses)]
        self._commit(family, lines)
        return previous

    def installed(self, family: Family) -> list[Target]:
        return _sources(tokens for _, tokens in self._read_chain(family) or [])

    def teardown(self, family: Family) -> None:
        lines = [f"-D INPUT -j {self.chain}"] * self._count_jumps(family)
        if self._read_chain(family) is not None:
            lines += [f"-F {self.chain}", f"-X {self.chain}"]
        if lines:
            self._commit(family, lines)

    def _append_line(self, address: Target) -> str:
        return f"-A {self.chain} {' '.join(self.shape.tokens(address))}"

    def _read_chain(self, family: Family) -> list[tuple[str, list[str]]] | None:
        """The chain's rules as (text, tokens) in `-S` form, or None if the chain is missing."""
        tool = self.list_tools[family]
        result = self._run([tool, "-S", self.chain])
        if result.returncode != 0:
            # iptables-nft 1.8.9 reports a missing chain as "incompatible", just
            # like a real problem; the table listing tells the two apart.
            table = self._run([tool, "-S"])
            if table.returncode == 0 and f"-N {self.chain}" not in table.stdout.splitlines():
                return None
            raise BackendError(f"{tool} -S {self.chain} failed: {trim(result.stderr)}")
        prefix = f"-A {self.chain} "
        rules = []
        for line in result.stdout.splitlines():
            if line.startswith(prefix):
                text = line[len(prefix) :]
                try:
                    tokens = shlex.split(text)
                except ValueError:  # quoting we do not understand: not one of ours
                    tokens = []
                rules.append((text, tokens))
        return rules

    def _count_jumps(self, family: Family) -> int:
        tool = self.list_tools[family]
        result = self._run([tool, "-S", "INPUT"])
        if result.returncode != 0:
            raise BackendError(f"{tool} -S INPUT failed: {trim(result.stderr)}")
        return result.stdout.splitlines().count(f"-A INPUT -j {self.chain}")

    def _commit(self, family: Family, lines: Sequence[str]) -> None:
        tool = self.restore_tools[family]
        batch = "*filter\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
        result = self._run([tool, "--noflush"], batch)
        if result.returncode != 0:
            raise BackendError(
                f"{tool} refused the change: {_explain_restore_error(result.stderr, lines)}"
            )

    @staticmethod
    def _run(
        argv: Sequence[str], input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return run_tool(argv, input_text)
        except FileNotFoundError:
            raise BackendError(f"{argv[0]} not found: {PACKAGE_HINT}") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"{argv[0]} did not finish within {TOOL_TIMEOUT:.0f} s") from None
        except OSError as exc:
            raise BackendError(f"{argv[0]} could not be run: {exc}") from None


def _sources(rules: Iterable[Sequence[str]]) -> list[Target]:
    return [source for tokens in rules if (source := _source_of(tokens)) is not None]


def _explain_restore_error(stderr: str, lines: Sequence[str]) -> str:
    """The tool's message, plus the batch line it names (line 1 of the batch is "*filter")."""
    message = trim(stderr)
    found = re.search(r"line:? (\d+)", stderr)
    if found and 2 <= int(found.group(1)) <= len(lines) + 1:
        message += f" [at: {lines[int(found.group(1)) - 2]}]"
    return message


# Python-iptables keeps one process-wide handle per table; calls must not interleave.
_LIBIPTC_GUARD = threading.Lock()


class _LegacyDriver(_Driver):
    """x_tables through python-iptables: one libiptc handle and one commit per call."""

    flavour: Flavour = "legacy"

    def __init__(self, chain: str, shape: RuleShape) -> None:
        super().__init__(chain, shape)
        try:
            # Imported here: python-iptables only speaks legacy x_tables, and
            # nft-only hosts need neither it nor its C libraries.
            import iptc
        except (ImportError, OSError) as exc:
            raise BackendError(
                f"the legacy iptables flavour needs python-iptables and libiptc ({exc}); "
                f"pip install python-iptables and {PACKAGE_HINT}, "
                f"or set firewall.iptables_flavour = 'nft'"
            ) from None
        self._iptc: Any = iptc
        # python-iptables looks through every table (nat, mangle, ...) whenever it meets
        # a jump to a user chain, opening a handle on each: on a real host that would
        # instantiate those legacy tables and keep stale handles. imr uses only filter.
        for table_class in (iptc.Table, iptc.Table6):
            for name in table_class.ALL:
                table_class.existing_table_names[name] = name == table_class.FILTER
        self.lock_path = os.environ.get("XTABLES_LOCKFILE") or DEFAULT_XTABLES_LOCKFILE
        self.lock_wait = XTABLES_LOCK_WAIT

    def prepare(self, family: Family) -> None:
        with self._table(family) as table:
            changed = False
            if not table.is_chain(self.chain):
                table.create_chain(self.chain)
                changed = True
            chain = self._iptc.Chain(table, self.chain)
            guard = self._guard_rule(family)
            guards = [rule for rule in chain.rules if rule == guard]
            if len(guards) != 1 or chain.rules[0] != guard:
                for rule in guards:
                    chain.delete_rule(rule)
                chain.insert_rule(guard, 0)
                changed = True
            jumps = self._jumps(table, family)
            if len(jumps) != 1:
                # None, or several (someone duplicated it): a delete takes the first match, so
                # drop them all and insert one at the top again, in the same commit.
                for jump in jumps:
                    self._iptc.Chain(table, "INPUT").delete_rule(jump)
                self._insert_jump(table, family)
                changed = True
            if changed:
                table.commit()

    def apply(self, family: Family, add: Sequence[Target], remove: Sequence[Target]) -> _Change:
        with self._table(family) as table:
            created = not table.is_chain(self.chain)
            if created:
                if not add:
                    return _Change()
                log.warning("chain %s is missing (IPv%d); creating it again", self.chain, family)
                table.create_chain(self.chain)
                self._iptc.Chain(table, self.chain).append_rule(self._guard_rule(family))
                self._insert_jump(table, family)
            chain = self._iptc.Chain(table, self.chain)
            plan = _plan(
                [(host_address(rule.src), rule) for rule in chain.rules],
                add,
                remove,
                lambda rule, address: bool(rule == self._rule(address)),
            )
            for rule in plan.delete:
                chain.delete_rule(rule)
            for address in plan.append:
                chain.append_rule(self._rule(address))
            if created or plan.delete or plan.append:
                table.commit()
            return plan.change

    def replace_all(self, family: Family, addresses: Sequence[Target]) -> list[Target]:
        with self._table(family) as table:
            previous: list[Target] = []
            if table.is_chain(self.chain):
                previous = self._sources(table)
                table.flush_entries(self.chain)
            elif addresses:
                table.create_chain(self.chain)
                self._insert_jump(table, family)
            else:
                return []
            chain = self._iptc.Chain(table, self.chain)
            chain.append_rule(self._guard_rule(family))
            for address in _unique(addresses):
                chain.append_rule(self._rule(address))
            table.commit()
            return previous

    def installed(self, family: Family) -> list[Target]:
        with self._table(family) as table:
            return self._sources(table) if table.is_chain(self.chain) else []

    def teardown(self, family: Family) -> None:
        with self._table(family) as table:
            jumps = self._jumps(table, family)
            for jump in jumps:
                self._iptc.Chain(table, "INPUT").delete_rule(jump)
            exists = bool(table.is_chain(self.chain))
            if exists:
                table.flush_entries(self.chain)
                table.delete_chain(self.chain)
            if jumps or exists:
                table.commit()

    @contextlib.contextmanager
    def _table(self, family: Family) -> Iterator[Any]:
        """A fresh handle on the filter table under the xtables lock, freed afterwards.

        The handle is made in the calling thread's network namespace and holds a
        socket there, so it is never kept between calls.
        """
        iptc = self._iptc
        tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
        with _LIBIPTC_GUARD, xtables_lock(self.lock_path, self.lock_wait):
            table: Any = None
            try:
                table_class = iptc.Table if family == 4 else iptc.Table6
                table = table_class(table_class.FILTER, autocommit=False)
                table.autocommit = False  # the table object is shared process-wide
                table.refresh()
                yield table
            except (iptc.IPTCError, iptc.XTablesError, ValueError) as exc:
                # libiptc's reason arrives as a bytes repr ("b'Too many links'").
                reason = re.sub(r"""b(['"])(.*?)\1""", r"\2", str(exc))
                raise BackendError(f"{tool} (python-iptables): {reason}") from None
            finally:
                if table is not None:
                    table.close()  # uncommitted changes are dropped (autocommit is off)

    def _rule(self, address: Target) -> Any:
        rule = self._iptc.Rule() if address.version == 4 else self._iptc.Rule6()
        rule.src = str(address)
        if self.shape.protocol:
            rule.protocol = self.shape.protocol
        if self.shape.dports:
            rule.create_match("multiport").dports = self.shape.dports
        rule.create_target("REJECT").reject_with = self.shape.reject_with[address.version]
        return rule

    def _guard_rule(self, family: Family) -> Any:
        rule = self._iptc.Rule() if family == 4 else self._iptc.Rule6()
        rule.create_match("conntrack").ctstate = "!NEW"
        rule.create_target("RETURN")
        return rule

    def _jump_rule(self, family: Family) -> Any:
        rule = self._iptc.Rule() if family == 4 else self._iptc.Rule6()
        rule.create_target(self.chain)
        return rule

    def _jumps(self, table: Any, family: Family) -> list[Any]:
        if not table.is_chain(self.chain):
            return []  # no jump can exist; and a jump rule cannot even be built without it
        jump = self._jump_rule(family)
        return [rule for rule in self._iptc.Chain(table, "INPUT").rules if rule == jump]

    def _insert_jump(self, table: Any, family: Family) -> None:
        self._iptc.Chain(table, "INPUT").insert_rule(self._jump_rule(family), 0)

    def _sources(self, table: Any) -> list[Target]:
        rules = self._iptc.Chain(table, self.chain).rules
        return [source for rule in rules if (source := host_address(rule.src)) is not None]


@contextlib.contextmanager
def xtables_lock(path: str, wait: float) -> Iterator[None]:
    """Hold the lock the iptables tools take, so no concurrent command loses our commit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        raise BackendError(f"cannot open the xtables lock {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackendError(
                        f"another iptables command held the xtables lock {path} "
                        f"for more than {wait:g} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------
# The backend


class IptablesBackend(Backend):
    name = "iptables"

    def __init__(self, config: FirewallConfig, flavour: str | None = None) -> None:
        """`flavour` overrides config.iptables_flavour: "auto", "nft" or "legacy"."""
        chosen, self._origin = resolve_flavour(config, flavour)
        self.config = config
        shape = RuleShape.from_config(config)
        self._driver: _Driver = (
            _NftDriver(config.chain, shape)
            if chosen == "nft"
            else _LegacyDriver(config.chain, shape)
        )
        # One change at a time: each is read, plan, write, which must not interleave.
        self._lock = threading.Lock()

    @property
    def flavour(self) -> Flavour:
        return self._driver.flavour

    def describe(self) -> str:
        return f"iptables ({FLAVOUR_LABELS[self.flavour]} flavour: {self._origin})"

    def prepare(self) -> None:
        with self._lock:
            for family in FAMILIES:
                self._driver.prepare(family)

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        adds = _by_family(block.address for block in add)
        removes = _by_family(remove)
        with self._lock:
            done: list[tuple[Family, _Change]] = []
            try:
                for family in FAMILIES:
                    if adds[family] or removes[family]:
                        change = self._driver.apply(family, adds[family], removes[family])
                        done.append((family, change))
            except BackendError:
                for family, change in done:
                    try:
                        self._driver.apply(family, change.removed, change.added)
                    except BackendError as exc:
                        log.error(
                            "could not undo the IPv%d half of a failed change: %s", family, exc
                        )
                raise

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        wanted = _by_family(block.address for block in blocks)
        with self._lock:
            done: list[tuple[Family, list[Target]]] = []
            try:
                for family in FAMILIES:
                    done.append((family, self._driver.replace_all(family, wanted[family])))
            except BackendError:
                for family, previous in done:
                    try:
                        self._driver.replace_all(family, previous)
                    except BackendError as exc:
                        log.error(
                            "could not undo the IPv%d half of a failed change: %s", family, exc
                        )
                raise

    def installed(self) -> set[Target]:
        with self._lock:
            return {address for family in FAMILIES for address in self._driver.installed(family)}

    def teardown(self) -> None:
        with self._lock:
            for family in FAMILIES:
                self._driver.teardown(family)

    def check(self, expected: Mapping[Slot, Expected]) -> Drift:
        """Chain, jump and rule count per family (one rule per address or network)."""
        structure: list[str] = []
        entries: list[str] = []
        with self._lock:
            for family in FAMILIES:
                tool = f"{'iptables' if family == 4 else 'ip6tables'}-{self.flavour}"
                survey = self._driver.survey(family)
                single, network = (expected[slot] for slot in _SLOTS_OF[family])
                wanted = Expected(single.low + network.low, single.high + network.high)
                if not survey.chain:
                    structure.append(f"chain {self._driver.chain} is missing ({tool})")
                elif survey.jumps == 0:
                    structure.append(
                        f"the jump from INPUT to {self._driver.chain} is missing ({tool})"
                    )
                if survey.chain and not survey.guard:
                    # Lost with the rules (a flush, say): replace_all puts both back.
                    entries.append(
                        f"chain {self._driver.chain} ({tool}) lost its first rule "
                        f"({GUARD_TEXT}: new connections only)"
                    )
                if survey.rules not in wanted:
                    entries.append(
                        f"chain {self._driver.chain} ({tool}) holds {survey.rules} rules, "
                        f"expected {wanted}"
                    )
        return Drift(tuple(structure), tuple(entries))


def _by_family(addresses: Iterable[Target]) -> dict[Family, list[Target]]:
    split: dict[Family, list[Target]] = {4: [], 6: []}
    for address in addresses:
        split[4 if address.version == 4 else 6].append(address)
    return split
