"""A bounded mapping that evicts the least recently used entry, one at a time.

Every cache of the service is one of these, sized by a setting: when it is full, adding an entry
evicts the one unused for longest, so a working set a little larger than the bound costs a few
misses, never a wholesale reload. A read (``get``) counts as a use; ``peek`` does not.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(
        self,
        capacity: int,
        *,
        on_evict: Callable[[K, V], None] | None = None,
        busy: Callable[[V], bool] | None = None,
    ) -> None:
        """``busy`` names entries that must not go now (work under way on them): eviction passes
        over them, and the cache may hold more than ``capacity`` until they are done."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._on_evict = on_evict
        self._busy = busy

    def get(self, key: K) -> V | None:
        """The value of ``key``, now the most recently used, or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value of ``key`` without counting a use."""
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        """Store ``value`` as the most recently used; evicts the least recently used if full."""
        self._items[key] = value
        self._items.move_to_end(key)
        excess = len(self._items) - self.capacity
        if excess <= 0:
            return
        # Oldest first, stopping at the first ``excess`` that are not busy: busy ones are few.
        candidates = (
            (old_key, old_value)
            for old_key, old_value in self._items.items()
            if old_key != key and (self._busy is None or not self._busy(old_value))
        )
        evicted = list(itertools.islice(candidates, excess))
        for old_key, old_value in evicted:
            del self._items[old_key]
            if self._on_evict is not None:
                self._on_evict(old_key, old_value)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def keys(self) -> Iterator[K]:
        """A snapshot of the keys, least recently used first."""
        return iter(list(self._items))
