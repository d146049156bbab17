"""The read requests: list, show and export, answered from the in-memory index of active
blocks or from the state file through the writer (never beside a batch's own use of it).

Split out of broker.py, which routes the requests here; status stays there (it reports
the broker's own life: backend, start time, fleet).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from imr.config import Config
from imr.core.addresses import Refusal, parse_target
from imr.core.clock import Clock
from imr.core.listing import ListQuery, select_blocks
from imr.protocol import (
    BlockInfo,
    ExportPage,
    ExportRequest,
    HitInfo,
    ListRequest,
    ListResult,
    ShowRequest,
    ShowResult,
)
from imr.server import replies
from imr.server.changes import BrokerError
from imr.server.prefix_blocks import PrefixBlocks
from imr.store import BlockRecord, Store
from imr.wire_codes import WireCode

InWriter = Callable[..., Awaitable[Any]]


class Reads:
    """list, show and export for the broker; `config` follows reloads (Broker.apply_config)."""

    def __init__(
        self,
        config: Config,
        active: dict[str, BlockRecord],
        store: Store,
        clock: Clock,
        prefix: PrefixBlocks,
        in_writer: InWriter,
    ) -> None:
        self.config = config
        self._active, self._store, self._clock = active, store, clock
        self._prefix, self._in_writer = prefix, in_writer

    def list(self, request: ListRequest) -> ListResult:
        now = self._clock.now()
        query = ListQuery(
            request.since, request.reason, request.source, request.limit, request.origin
        )
        records: Iterable[BlockRecord] = self._active.values()
        if request.networks:  # a few among 100,000: the text says which (issue #16)
            records = [r for r in records if "/" in r.ip]
        listing = select_blocks(records, query, now)
        return replies.list_reply(listing, now, len(self._active))

    async def show(self, request: ShowRequest) -> ShowResult:
        """The address's history, newest first: one page of at most state.page_rows blocks
        and hits; `next_before` asks for the hits before this page."""
        parsed = parse_target(request.ip)
        if isinstance(parsed, Refusal):
            raise BrokerError(WireCode(parsed.code), parsed.message)
        ip = str(parsed)
        rows = min(request.limit or self.config.state.page_rows, self.config.state.page_rows)
        # One row more than the page, to know whether there is another.
        page = await self._in_writer(self._store.history_page, ip, rows + 1, request.before)
        reply = replies.show_reply(ip, self._active.get(ip), page, rows, self._clock.now())
        # The network block that holds this address out of the kernel (issue #16), if any:
        # one dict read, atomic under the GIL beside the writer thread's changes of it.
        reply["covered_by"] = self._prefix.held_out.get(ip)
        return reply

    async def export(self, request: ExportRequest) -> ExportPage:
        """One page of the whole state, blocks then hits, each by id; `next` is the cursor
        of the following page (None after the last). A page costs the daemon its own rows
        (at most state.page_rows), so an export of any size never holds more than that."""
        rows = min(request.limit or self.config.state.page_rows, self.config.state.page_rows)
        table, _, after = (request.after or "blocks:0").partition(":")
        last = int(after)
        blocks: list[BlockInfo] = []
        hits: list[HitInfo] = []
        following: str | None
        now = self._clock.now()
        if table == "blocks":
            found = await self._in_writer(self._store.blocks_after, last, rows)
            blocks = [replies.block_info(b, now) for b in found]
            more = len(found) == rows
            following = f"blocks:{found[-1].id}" if more else "hits:0"
        else:
            found_hits = await self._in_writer(self._store.hits_after, last, rows)
            hits = [replies.hit_info(h) for h in found_hits]
            more = len(found_hits) == rows
            following = f"hits:{found_hits[-1].id}" if more else None
        return replies.export_reply(blocks, hits, following)
