"""The bounded cache every cache of the service is built on."""

from __future__ import annotations

import pytest

from app.core.lru import LRU


def test_a_full_cache_evicts_the_least_recently_used_one_at_a_time() -> None:
    evicted: list[tuple[str, int]] = []
    cache: LRU[str, int] = LRU(3, on_evict=lambda key, value: evicted.append((key, value)))
    for index, key in enumerate("abc"):
        cache.put(key, index)
    assert cache.get("a") == 0  # a use: "b" is now the least recently used
    assert cache.peek("b") == 1  # a look is not a use
    cache.put("d", 3)
    assert evicted == [("b", 1)]
    assert list(cache.keys()) == ["c", "a", "d"]
    cache.put("c", 9)  # replacing counts as a use and evicts nothing
    assert evicted == [("b", 1)]
    assert list(cache.keys()) == ["a", "d", "c"]
    assert len(cache) == 3


def test_pop_and_membership() -> None:
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    assert "a" in cache
    assert cache.pop("a") == 1
    assert cache.pop("a") is None
    assert cache.get("a") is None


def test_a_cache_holds_at_least_one_entry() -> None:
    with pytest.raises(ValueError, match="capacity"):
        LRU(0)


def test_busy_entries_are_passed_over_until_they_are_done() -> None:
    busy = {"a"}
    evicted: list[str] = []
    cache: LRU[str, str] = LRU(
        2, on_evict=lambda key, _value: evicted.append(key), busy=lambda value: value in busy
    )
    cache.put("a", "a")
    cache.put("b", "b")
    cache.put("c", "c")  # "a" is the oldest but busy: "b" goes
    assert evicted == ["b"]
    cache.put("d", "d")  # only "a" and "c" are older, "a" still busy
    assert evicted == ["b", "c"]
    busy.clear()
    cache.put("e", "e")
    assert evicted == ["b", "c", "a"]
    assert list(cache.keys()) == ["d", "e"]
