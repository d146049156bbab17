"""The two iptables flavours behind one small interface, one address family per call.

* `_NftDriver`: iptables-nft, read with `-S`, written with one restore batch a call
  (and, with `tools="legacy"`, the legacy flavour's per-address changes);
* `_LegacyDriver`: x_tables through python-iptables for structure (prepare,
  replace_all, teardown), under the xtables lock that `xtables_lock` takes.

backends/iptables.py's docstring describes the chain and why each flavour works as it does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from imr.backends.base import BackendError
from imr.backends.iptables_rules import (
    GUARD,
    GUARD_TEXT,
    Family,
    RuleShape,
    _Change,
    _plan,
    _source_of,
    _tokens,
    _unique,
    host_address,
)
from imr.backends.xtables import PACKAGE_HINT, TOOL_TIMEOUT, Flavour, run_tool, trim
from imr.core.addresses import Target
from imr.netlink import where_we_are

log = logging.getLogger("imr.backend")

XTABLES_LOCK_WAIT = 10.0  # seconds we wait for another iptables command to finish
DEFAULT_XTABLES_LOCKFILE = "/run/xtables.lock"


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

    def __init__(self, chain: str, shape: RuleShape, tools: Flavour = "nft") -> None:
        """`tools="legacy"`: the legacy flavour's per-address changes, made the same way
        with iptables-legacy-restore (it takes the xtables lock: `-w`)."""
        super().__init__(chain, shape)
        self.list_tools: dict[int, str] = {4: f"iptables-{tools}", 6: f"ip6tables-{tools}"}
        self.restore_tools: dict[int, str] = {
            4: f"iptables-{tools}-restore",
            6: f"ip6tables-{tools}-restore",
        }
        self.wait = ["-w", "10"] if tools == "legacy" else []
        missing = [
            tool
            for tool in (*self.list_tools.values(), *self.restore_tools.values())
            if shutil.which(tool) is None
        ]
        if missing:
            raise BackendError(f"{', '.join(missing)} not found: {PACKAGE_HINT}")
        self._cache: dict[Family, list[tuple[str, list[str]]]] = {}
        self._cache_where: tuple[int, str] | None = None

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
        cached = self._cached(family)
        if cached is not None:
            try:
                return self._apply(family, add, remove, cached)
            except BackendError as exc:  # the chain changed behind our back: read it
                log.info("change from the cached chain refused (%s); reading the chain", exc)
        return self._apply(family, add, remove, self._read_chain(family))

    def _cached(self, family: Family) -> list[tuple[str, list[str]]] | None:
        """The chain as the last change left it, if made in this namespace: reading it again
        costs a process and, with many rules, most of a change."""
        where = where_we_are()
        if self._cache_where != where:
            self._cache.clear()
            self._cache_where = where
        return self._cache.pop(family, None)

    def _apply(
        self,
        family: Family,
        add: Sequence[Target],
        remove: Sequence[Target],
        rules: list[tuple[str, list[str]]] | None,
    ) -> _Change:
        lines = []
        created = rules is None
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
            lambda text, address: _tokens(text) == self.shape.tokens(address),
        )
        # Deleting by the kernel's own text removes exactly the listed rule, whatever its shape.
        lines += [f"-D {self.chain} {text}" for text in plan.delete]
        lines += [self._append_line(address) for address in plan.append]
        if lines:
            self._commit(family, lines)
        # What the chain holds now. A rule someone else adds or deletes in between shows as
        # a refused delete (the batch is refused whole, then the chain is read) or as drift.
        gone = set(plan.delete)
        after = [(GUARD_TEXT, GUARD)] if created else []
        after += [rule for rule in rules if rule[0] not in gone]
        for address in plan.append:
            tokens = self.shape.tokens(address)
            after.append((" ".join(tokens), tokens))
        self._cache[family] = after
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
        self._cache.pop(family, None)  # any read (replace_all, installed ...): read afresh
        tool = self.list_tools[family]
        result = self._run([tool, *self.wait, "-S", self.chain])
        if result.returncode != 0:
            # iptables-nft 1.8.9 reports a missing chain as "incompatible", just
            # like a real problem; the table listing tells the two apart.
            table = self._run([tool, *self.wait, "-S"])
            if table.returncode == 0 and f"-N {self.chain}" not in table.stdout.splitlines():
                return None
            raise BackendError(f"{tool} -S {self.chain} failed: {trim(result.stderr)}")
        prefix = f"-A {self.chain} "
        rules = []
        for line in result.stdout.splitlines():
            if line.startswith(prefix):
                text = line[len(prefix) :]
                rules.append((text, _tokens(text)))
        return rules

    def _count_jumps(self, family: Family) -> int:
        tool = self.list_tools[family]
        result = self._run([tool, "-S", "INPUT"])
        if result.returncode != 0:
            raise BackendError(f"{tool} -S INPUT failed: {trim(result.stderr)}")
        return result.stdout.splitlines().count(f"-A INPUT -j {self.chain}")

    def _commit(self, family: Family, lines: Sequence[str]) -> None:
        self._cache.pop(family, None)  # kept only by apply, after its commit
        tool = self.restore_tools[family]
        batch = "*filter\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
        result = self._run([tool, *self.wait, "--noflush"], batch)
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
        self._writer = _NftDriver(chain, shape, "legacy")

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
        """One iptables-legacy-restore batch: python-iptables builds a Python object for
        every rule of the chain on each change (~1 ms a rule, 0.5 s at 500 rules)."""
        return self._writer.apply(family, add, remove)

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
        self._writer._cache.pop(family, None)  # the chain may change here: read it afresh
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
