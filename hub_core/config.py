"""Method configs: dataclasses whose fields carry help text and validate themselves.

A method declares ``config_class = SomeConfig`` where ``SomeConfig`` subclasses
:class:`MethodConfig` and builds its fields with :func:`option`. Values arrive from YAML files and
``--set key=value`` flags, so :meth:`MethodConfig.from_dict` coerces strings to the field's type and
rejects unknown keys before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar

from .errors import ConfigError


def option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A config field with its help text (and optional allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class MethodConfig:
    """Base of every method config. Subclasses are dataclasses and validate in ``validate``."""

    method_name: ClassVar[str] = "method"
    help_command: ClassVar[str] = "adapterhub plugins --method {name}"
    """Where a user reads the valid keys (objective configs point to ``adapterhub objectives``)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"{self.method_name} config: {f.name}={value!r} is not one of {list(choices)}"
                )
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that make no sense; called on construction."""

    # -- construction from user input ----------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None) -> "MethodConfig":
        """Build from a mapping of field name to value (strings are coerced to the field type)."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{cls.method_name} config has no key {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(sorted(known)) or '(none)'} "
                f"(see `{cls.help_command.format(name=cls.method_name)}`)"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            kwargs[name] = _coerce(cls.method_name, name, value, hints.get(name, Any))
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.method_name} config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Field name, type, default and help for docs and ``adapterhub plugins``."""
        rows = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(
                {
                    "name": f.name,
                    "type": _type_name(hints.get(f.name, Any)),
                    "default": default,
                    "help": f.metadata.get("help", ""),
                    "choices": list(f.metadata["choices"]) if f.metadata.get("choices") else None,
                }
            )
        return rows


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(method: str, key: str, value: Any, tp: Any) -> Any:
    """Turn a ``--set`` string (or YAML scalar) into the field's declared type."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        tp = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(tp)
    bad = ConfigError(
        f"{method} config: {key}={value!r} is not a valid {_type_name(tp)}; "
        f"e.g. --set {key}=<{_type_name(tp)}>"
    )
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise bad
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise bad
            return int(value) if not isinstance(value, str) else int(value.strip())
        if tp is float:
            if isinstance(value, bool):
                raise bad
            return float(value)
        if tp is str:
            return str(value)
        if origin in (list, tuple) or tp in (list, tuple):
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("["):
                    value = json.loads(text)
                else:
                    value = [v.strip() for v in text.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise bad
            inner = (typing.get_args(tp) or (Any,))[0]
            items = [_coerce(method, key, v, inner) if inner is not Any else v for v in value]
            return list(items)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise bad from None
    return value
