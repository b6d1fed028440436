"""Explicit registries for the extensible families (datasets, models, objectives, metrics).

A registry is a dict with a decorator that refuses duplicate names and a lookup whose
error lists the valid names. Nothing registers by import side effect from outside the
package: each family's ``__init__`` imports its own modules, so a registry is complete as
soon as it is importable.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
  """A name that is not registered; the message lists the valid names."""

  def __str__(self) -> str:
    return str(self.args[0])


class Registry(Generic[T]):
  """A named mapping from string keys to builders of one family."""

  def __init__(self, family: str):
    self.family = family
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Returns a decorator that registers its argument under ``name``.

    Raises:
      ValueError: if ``name`` is already registered in this family.
    """

    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.family} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj

    return decorator

  def get(self, name: str) -> T:
    """Returns the entry for ``name``; the error lists the valid names."""
    try:
      return self._entries[name]
    except KeyError:
      raise UnknownNameError(
          f"Unknown {self.family} {name!r}; valid names: {', '.join(sorted(self._entries))}."
      ) from None

  def names(self) -> list[str]:
    """The registered names, sorted."""
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    """The names in the order they were registered (``names`` sorts them)."""
    return iter(self._entries)
