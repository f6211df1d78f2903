"""One small generic registry: register factories by decorator, create them by name."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from misleader.errors import MisleaderError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> factory mapping with decorator registration and helpful errors.

    Example:
        >>> models = Registry("model")
        >>> @models.register("tiny")
        ... def tiny() -> int:
        ...     return 3
        >>> models.create("tiny")
        3
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MisleaderError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, /, **kwargs: object) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
