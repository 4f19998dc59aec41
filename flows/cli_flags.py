"""Command-line flags generated from the parameter models (`storage.params`), so that a flag's
default, type, choices and help are the model field's and cannot drift from the API's.

`add_model_flag(parser, Model, "field")` declares `--field` (underscores become dashes). The parsed
namespace remembers which flags the user typed: `given_values(args, Model)` returns only those, so
a model sees as set (`model_fields_set`) exactly what was set on the command line, as from the API
(a resumed training run compares only those with its checkpoint).
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Sequence

from pydantic import BaseModel

_GIVEN = "_given_fields"  # namespace attribute: the set of field names whose flag was typed


def _mark_given(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, _GIVEN, set(getattr(namespace, _GIVEN, ())) | {dest})


class _Store(argparse.Action):
    """--flag VALUE."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class _Switch(argparse.Action):
    """--flag sets True (store_true)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        _mark_given(namespace, self.dest)


class _Bool(argparse.BooleanOptionalAction):
    """--flag / --no-flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _mark_given(namespace, self.dest)


class _Append(argparse.Action):
    """--flag VALUE, repeatable; the typed values replace the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        typed = getattr(namespace, _GIVEN, set())
        items = list(getattr(namespace, self.dest)) if self.dest in typed else []
        setattr(namespace, self.dest, [*items, values])
        _mark_given(namespace, self.dest)


_ACTIONS = {"value": _Store, "switch": _Switch, "bool": _Bool, "append": _Append}


def _value_type(annotation) -> tuple[type, list | None]:
    """(argparse type, choices) for a field's annotation: Optional unwrapped, Literal and Enum as choices."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str, [member.value for member in annotation]
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def _shown(default) -> str:
    if isinstance(default, enum.Enum):
        return str(default.value)
    if isinstance(default, (tuple, list)):
        return ",".join(map(str, default))
    return str(default)


def add_model_flag(parser: argparse.ArgumentParser, model: type[BaseModel], field: str, *flags: str,
                   kind: str | None = None, help: str | None = None, **kwargs) -> argparse.Action:
    """Declare the flag of `model.field` on `parser`; returns the argparse action.

    `flags` default to `--field-name`; `kind` is "value" (default), "switch" (store_true, the default
    for a bool field), "bool" (--flag/--no-flag) or "append" (repeatable, for tuple fields); `help`
    defaults to the field's description. The default is the field's default; a required field (or
    required=True) makes a required flag without one. Type and choices follow the annotation unless
    `kwargs` (type=, choices=, metavar=) say otherwise. Raises KeyError for a field the model does not declare and
    ValueError for an unknown `kind`.
    """
    info = model.model_fields[field]
    annotation = info.annotation
    kind = kind or ("switch" if annotation is bool else "value")
    if kind not in _ACTIONS:
        raise ValueError(f"kind must be one of {', '.join(_ACTIONS)}, got {kind!r}")
    text = help if help is not None else (info.description or "")
    options: dict = {"dest": field, "action": _ACTIONS[kind]}
    if kwargs.pop("required", info.is_required()):
        options["required"] = True
    else:
        options["default"] = info.default
        if info.default not in (None, False, ()) and kind != "bool":
            text = f"{text} (default: {_shown(info.default)})" if text else f"default: {_shown(info.default)}"
    if kind in ("value", "append"):
        value_type, choices = _value_type(typing.get_args(annotation)[0] if kind == "append" else annotation)
        options["type"] = value_type
        if choices is not None:
            options["choices"] = choices
    options.update(kwargs)
    return parser.add_argument(*(flags or ("--" + field.replace("_", "-"),)), help=text or None, **options)


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], fields: Sequence[str]) -> None:
    """`add_model_flag` for each of `fields` with the derived flag name, type and help."""
    for field in fields:
        add_model_flag(parser, model, field)


def given_values(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The fields of `model` whose flags were typed, with their values (lists become tuples)."""
    typed = getattr(args, _GIVEN, set())
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in vars(args).items() if name in typed and name in model.model_fields}
