"""Shared plumbing for the typed model configs: dict round trip for checkpoints, with clear errors."""
import dataclasses
import math
import typing
from typing import Any, Dict, Type, TypeVar

T = TypeVar('T', bound='ConfigBase')


class ConfigBase:
    """Mixin for frozen config dataclasses that are saved inside checkpoints as plain dicts."""

    RENAMED_FIELDS: Dict[str, str] = {}  # old field name -> current name, for checkpoints saved before a rename

    @classmethod
    def current_names(cls, d: Dict[str, Any]) -> Dict[str, Any]:
        """A saved config dict with the fields of older versions under their current names."""
        return {cls.RENAMED_FIELDS.get(k, k): v for k, v in d.items()}

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: Type[T], d: Dict[str, Any]) -> T:
        """The config from a dict; a ValueError names unknown fields and values of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f'{cls.__name__}: expected a dict of fields, found {type(d).__name__}')
        d = cls.current_names(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ValueError(f'{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}')
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            if not _fits(v, hints[k]):
                raise ValueError(f'{cls.__name__}: field {k} must be {_type_name(hints[k])}, found {v!r}')
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self: T, **changes) -> T:
        return dataclasses.replace(self, **changes)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _fits(value: Any, hint) -> bool:
    """Whether a plain (JSON-like) value fits a config field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return True


def _type_name(hint) -> str:
    return str(hint).replace('typing.', '') if typing.get_origin(hint) else hint.__name__
