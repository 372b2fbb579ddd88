"""Caches of what entries build once per shape (masks, block masks, decode plans, projections),
bounded by bytes, and released together.

A sweep's worker runs many points in a row, so what an impl builds per shape is kept between its
calls (built by the untimed cold call, reused by the timed ones). Long sequences make these big — a
dense mask at n 32,768 is 1 GiB — so each cache holds at most its byte budget, always keeping the
newest entry (the one the running point uses), and :func:`release_caches` empties them all when a
worker moves on to another group of points.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_CACHES: list[BytesCache] = []


def nbytes(value: Any) -> int:
    """Bytes of the tensors ``value`` holds: a tensor, or tensors in a tuple, dataclass or object."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes() if value.numel() else 0
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values() if isinstance(v, torch.Tensor))
    return 0


class BytesCache:
    """A least-recently-used cache of one function's results, holding at most ``max_bytes`` of
    tensors besides its newest entry."""

    def __init__(self, fn: Callable[..., Any], max_bytes: int) -> None:
        self.fn = fn
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        functools.update_wrapper(self, fn)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        value = self.fn(*args, **kwargs)
        self._entries[key] = (value, nbytes(value))
        while len(self._entries) > 1 and self.bytes > self.max_bytes:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


def cached_by_bytes(max_bytes: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: the function's results kept in a :class:`BytesCache` of ``max_bytes``."""
    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        cache = BytesCache(fn, max_bytes)
        _CACHES.append(cache)
        return cache

    return wrap


def release_caches() -> None:
    """Empty every cache: what one group's points built is of no use to the next group."""
    for cache in _CACHES:
        cache.clear()
