"""The control plane's value limit (runtime/protocol.py GuardedStore) over a real TCPStore."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from spotpipe.runtime import protocol


@pytest.fixture()
def raw_store() -> Any:
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=10), wait_for_workers=False)


def test_the_limit_is_a_control_record_size() -> None:
    """Tensors never go through the store: the limit is far below one stage's state (the default
    model's smallest stage holds about 0.4 M parameters, 1.6 MB of gradient)."""
    assert protocol.STORE_VALUE_LIMIT == 64 * 2**10


def test_a_value_over_the_limit_is_refused_by_name_and_nothing_is_written(raw_store: Any) -> None:
    store = protocol.GuardedStore(raw_store)
    store.set("small", b"x" * protocol.STORE_VALUE_LIMIT)  # at the limit: fine
    assert bytes(store.get("small")) == b"x" * protocol.STORE_VALUE_LIMIT
    for write in (lambda: store.set("big", b"y" * (protocol.STORE_VALUE_LIMIT + 1)),
                  lambda: store.compare_set("big", "", "z" * (protocol.STORE_VALUE_LIMIT + 1)),
                  lambda: store.queue_push("bigq", b"q" * (protocol.STORE_VALUE_LIMIT + 1))):
        with pytest.raises(protocol.StoreValueTooLarge, match=rf"refusing to write {protocol.STORE_VALUE_LIMIT + 1} bytes under store key 'big"):
            write()
    assert not raw_store.check(["big"])


def test_bytes_written_are_counted_across_clones(raw_store: Any) -> None:
    """A worker's heartbeat and mirror threads use clones; the step report sums them all."""
    store = protocol.GuardedStore(raw_store)
    store.set("a", "12345")
    clone = store.clone()
    assert isinstance(clone, protocol.GuardedStore) and clone.raw is not raw_store
    clone.set("bb", b"123")
    clone.add("ctr", 2)
    assert store.written.total == (1 + 5) + (2 + 3) + (3 + 8)
    assert int(store.get("ctr")) == 2 and store.check(["a", "bb"])  # reads pass through
