"""A name -> class registry, the one behind tasks and compression methods (a plug-in is one
decorator)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


class Registry(dict[str, type]):
    """Classes by name; ``kind`` and ``error`` make the messages ("unknown task 'x'; ...")."""

    def __init__(self, kind: str, error: type[Exception]) -> None:
        super().__init__()
        self.kind, self.error = kind, error

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register ``cls`` under ``name`` (and set ``cls.name``)."""

        def decorate(cls: T) -> T:
            if name in self and self[name] is not cls:
                raise self.error(f"{self.kind} name {name!r} is already registered")
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def lookup(self, name: str) -> type:
        if name not in self:
            known = ", ".join(sorted(self)) or "(none)"
            raise self.error(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        return self[name]
