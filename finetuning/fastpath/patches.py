"""What the overrides change, recorded so that all of it is put back when the run ends: attributes set on objects
(a module's forward, the model's config), entries added to a registry, settings of torch that are process-wide."""
from __future__ import annotations

from typing import Any, Callable

_MISSING = object()


class Patches:
    """A stack of changes; `restore()` undoes them, newest first. An instance attribute set where the class had the
    name is removed again (not set to the class's value), so the object ends as it began."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def set(self, target: Any, name: str, value: Any) -> None:
        old = target.__dict__.get(name, _MISSING) if hasattr(target, "__dict__") else getattr(target, name, _MISSING)
        setattr(target, name, value)

        def undo():
            if old is _MISSING:
                try:
                    delattr(target, name)
                except AttributeError:
                    pass
            else:
                setattr(target, name, old)

        self._undo.append(undo)

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Any other change, with the function that undoes it."""
        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __len__(self) -> int:
        return len(self._undo)
