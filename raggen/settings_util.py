"""Helpers for the settings convention: a library declares its settings once as a frozen pydantic
class; the config section that the library reads *inherits* that class (a mutable copy of the same
fields plus the section's own), and the application layer hands the library the frozen part."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

S = TypeVar("S", bound=BaseModel)


def section_part(section: BaseModel, cls: type[S]) -> S:
    """The ``cls`` part of a config section that inherits ``cls`` (as that frozen class: what the
    library receives). Values were validated when the section was, so they are not validated again."""
    return cls.model_construct(**{name: getattr(section, name) for name in cls.model_fields})
