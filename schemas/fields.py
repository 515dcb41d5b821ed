"""Field types for message declarations: each knows its wire type and limits.

`check(value)` returns the value (possibly normalised) or raises ValueError
with a short human reason; the codec turns that into a protocol error with
the field's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_valid_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and ID_PATTERN.fullmatch(value) is not None
        and ".." not in value
    )


@dataclass(frozen=True)
class Field:
    required: bool = True

    def check(self, value):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Id(Field):
    def check(self, value):
        if not is_valid_id(value):
            raise ValueError("not a valid id ([A-Za-z0-9][A-Za-z0-9._-]{0,127}, no '..')")
        return value

    def describe(self) -> str:
        return "id"


@dataclass(frozen=True)
class Int(Field):
    min: int = 0
    max: int = 2**63 - 1

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("not an integer")
        if not self.min <= value <= self.max:
            raise ValueError(f"{value} outside [{self.min}, {self.max}]")
        return value

    def describe(self) -> str:
        return f"int {self.min}..{self.max}"


@dataclass(frozen=True)
class Bool(Field):
    def check(self, value):
        if not isinstance(value, bool):
            raise ValueError("not a boolean")
        return value

    def describe(self) -> str:
        return "bool"


@dataclass(frozen=True)
class Str(Field):
    max_len: int = 256
    choices: tuple = ()

    def check(self, value):
        if not isinstance(value, str):
            raise ValueError("not a string")
        if len(value) > self.max_len:
            raise ValueError(f"longer than {self.max_len}")
        if self.choices and value not in self.choices:
            raise ValueError(f"not one of {', '.join(self.choices)}")
        return value

    def describe(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        return f"str ≤{self.max_len}"


@dataclass(frozen=True)
class Bin(Field):
    size: int | None = None
    max_len: int = 1024
    nullable: bool = False

    def check(self, value):
        if value is None and self.nullable:
            return None
        if not isinstance(value, bytes):
            raise ValueError("not bytes")
        if self.size is not None and len(value) != self.size:
            raise ValueError(f"length {len(value)} is not {self.size}")
        if len(value) > self.max_len:
            raise ValueError(f"longer than {self.max_len}")
        return value

    def describe(self) -> str:
        kind = f"bin[{self.size}]" if self.size is not None else f"bin ≤{self.max_len}"
        return kind + ("|nil" if self.nullable else "")


@dataclass(frozen=True)
class ListOf(Field):
    item: Field = None  # type: ignore[assignment]
    max_items: int = 1024

    def check(self, value):
        if not isinstance(value, list):
            raise ValueError("not a list")
        if len(value) > self.max_items:
            raise ValueError(f"more than {self.max_items} items")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(self.item.check(item))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return out

    def describe(self) -> str:
        return f"[{self.item.describe()}] ≤{self.max_items}"


@dataclass(frozen=True)
class Doc(Field):
    """A free-form document (status, catalog). Only sent by the broker to
    operators; its size is bounded by the header limit of its message."""

    def check(self, value):
        if not isinstance(value, (dict, list)):
            raise ValueError("not a map or list")
        return value

    def describe(self) -> str:
        return "document"


HASH = Bin(size=32, max_len=32)
