"""Shared plumbing for the typed model configs: dict round trip for checkpoints, with clear errors."""
import dataclasses
from typing import Any, Dict, Type, TypeVar

T = TypeVar('T', bound='ConfigBase')


class ConfigBase:
    """Mixin for frozen config dataclasses that are saved inside checkpoints as plain dicts."""

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: Type[T], d: Dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f'{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}')
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self: T, **changes) -> T:
        return dataclasses.replace(self, **changes)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
