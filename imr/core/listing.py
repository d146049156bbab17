"""Which active blocks `imr list` shows: the filters, as a pure function of the in-memory index.

The daemon answers `list` from its own index of active blocks, never from the
kernel (listing a set of 100,000 elements takes seconds). The filters combine
(all must match):

- `since`: blocked within this many seconds before `now`;
- `reason`: the block's reason contains this text (case-insensitive);
- `source`: the block's source tag is this tag or starts with it and a colon (`logscan`
  matches `logscan` and `logscan:nginx-404`, not `logscanner`), case-sensitive like the
  tags; with a `*`, `?` or `[` in it, the tag matches it as a glob (`logscan*`, `modsec*:9*`);
- `origin`: the fleet member the block came from ("local": made here; docs/fleet.md);
- `limit`: at most this many rows, the oldest first (the order of the listing).
"""

from __future__ import annotations

import fnmatch
import heapq
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Listable(Protocol):
    """What the filters read of a block (imr.store.BlockRecord has it)."""

    @property
    def id(self) -> int: ...

    @property
    def blocked_at(self) -> float: ...

    @property
    def reason(self) -> str: ...

    @property
    def source(self) -> str: ...


R = TypeVar("R", bound=Listable)


@dataclass(frozen=True, slots=True)
class ListQuery:
    since: float | None = None  # seconds
    reason: str | None = None
    source: str | None = None
    limit: int | None = None
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class Listing(Generic[R]):
    rows: list[R]
    matched: int  # how many matched the filters before the limit


GLOB_CHARACTERS = frozenset("*?[")


def source_matcher(pattern: str) -> Callable[[str], bool]:
    """A source tag test: the tag or a `tag:...` below it, or a case-sensitive glob if
    `pattern` has glob characters (the log scanner tags `logscan:<signature>`)."""
    if not GLOB_CHARACTERS & set(pattern):
        below = pattern + ":"
        return lambda source: source == pattern or source.startswith(below)
    compiled = re.compile(fnmatch.translate(pattern))
    return lambda source: compiled.fullmatch(source) is not None


def select_blocks(records: Iterable[R], query: ListQuery, now: float) -> Listing[R]:
    """The records matching `query`, ordered by (blocked_at, id), cut to `query.limit`."""
    matching = list(records)
    if query.since is not None:
        cutoff = now - query.since
        matching = [r for r in matching if r.blocked_at >= cutoff]
    if query.source is not None:
        matches = source_matcher(query.source)
        matching = [r for r in matching if matches(r.source)]
    if query.origin is not None:
        wanted = None if query.origin == "local" else query.origin
        matching = [r for r in matching if getattr(r, "origin", None) == wanted]
    if query.reason:
        needle = query.reason.casefold()
        matching = [r for r in matching if needle in r.reason.casefold()]

    def order(r: R) -> tuple[float, int]:
        return (r.blocked_at, r.id)

    if query.limit is not None and query.limit < len(matching):
        rows = heapq.nsmallest(query.limit, matching, key=order)
    else:
        rows = sorted(matching, key=order)
    return Listing(rows, len(matching))
