"""Epochs and the claims that carry them, without processes: every number a
peer sends that reaches SQLite is bounded by the decoders, a failing role
change is logged and counted instead of ending the agent, and a higher epoch
is believed only once the agent it names confirms it."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest

from agent.config import load
from agent.core import changelog, forwarding
from agent.core.changelog import GENESIS, Position
from agent.core.replication import (
    TAG,
    Hello,
    ProtocolError,
    decode,
    encode,
)
from agent.core.wire import JS_SAFE
from agent.runtime.leadership import Replication
from agent.runtime.sync_service import SyncService
from agent.store import Store

A, B = b"a" * 16, b"b" * 16
H = b"\x01" * 32


def _raw(*fields: Any) -> bytes:
    return bytes([TAG]) + msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize("big", [JS_SAFE + 1, 1 << 63, (1 << 64) - 1])
def test_numbers_past_the_js_safe_bound_are_refused(big: int) -> None:
    assert decode(encode(Hello(JS_SAFE, A, Position(JS_SAFE, JS_SAFE, H)))).epoch == JS_SAFE
    for data in (_raw(1, big, A, 0, 0, GENESIS),  # HELLO epoch
                 _raw(1, 1, A, big, 0, GENESIS),  # HELLO position epoch
                 _raw(1, 1, A, 0, big, GENESIS),  # HELLO position seq
                 _raw(6, big, 1, 1, H),  # ACK epoch
                 _raw(6, 1, 1, big, H),  # ACK seq
                 _raw(11, big, A, "Leader", "", A, 0, 0, GENESIS)):  # INFO epoch
        with pytest.raises(ProtocolError):
            decode(data)
    fwd = msgpack.packb([forwarding.ANSWER, big, 1, 200, "", None, None, 0])
    with pytest.raises(forwarding.ProtocolError):
        forwarding.decode(fwd)
    req = msgpack.packb([forwarding.REQUEST, big, A, 1, forwarding.DELETE, "c", ["k"]])
    with pytest.raises(forwarding.ProtocolError):
        forwarding.decode(req)
    entry = changelog.encode(big, 1, GENESIS, A, 1, "c", "k", 1, b"\x01")
    with pytest.raises(changelog.EntryInvalid):
        changelog.decode(entry)


@asynccontextmanager
async def replication(tmp_path: Path, env: dict[str, str],
                      peers: Callable[[], list[Any]] | None = None,
                      ) -> AsyncIterator[tuple[Replication, Store]]:
    cfg, _ = load(environ=env)
    store = await Store.open(tmp_path, A)
    sync = SyncService(store, "127.0.0.1", 0, 0.2, 2, 1 << 20, rng=random.Random(1))
    rep = Replication(cfg, store, sync, A, lambda: None, random.Random(2), peers)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rep.run)
            while rep._tg is None:
                await anyio.sleep(0.01)
            yield rep, store
            tg.cancel_scope.cancel()
    finally:
        await store.close()


def test_a_failing_step_down_is_logged_and_counted_not_fatal(tmp_path: Path) -> None:
    async def main() -> None:
        async with replication(tmp_path, {"HS_GOSSIP_ROLE": "leader"}) as (rep, store):
            async def broken(*_: Any) -> None:
                raise OverflowError("Python int too large to convert to SQLite INTEGER")

            store.see_epoch = broken  # type: ignore[method-assign]
            rep._on_higher_epoch(2, "")
            with anyio.fail_after(5):
                while not rep.stats.get("task_failures"):
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)  # the agent's task group is still running

    anyio.run(main, backend="trio")
