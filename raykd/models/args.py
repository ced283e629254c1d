"""Checking ``ModelConfig.args`` against a model builder's signature.

Each builder declares its user-settable arguments as keyword-only parameters with type annotations
(``dropout: Probability = 0.0``). The annotation is the single source of truth: pydantic validates
the user's value against it, and :func:`describe` turns it into the "allowed: ..." text of the
one-line error. No separate schema to keep in sync.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import annotated_types
from pydantic import Field, TypeAdapter, ValidationError

# Argument types shared by the builders. Annotated bounds are enforced by pydantic.
PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]  # dropout rates: 1.0 would zero every unit


class BadArgs(ValueError):
    """A builder's arguments do not fit together (e.g. hidden not divisible by heads).

    Builders do not know which config field they were called for, so they raise this and
    :func:`raykd.models.registry.build_model` turns it into ``ConfigError("<field>.args: ...")``.
    """


def user_parameters(builder: Callable[..., Any], fixed: Iterable[str] = ()
                    ) -> dict[str, inspect.Parameter]:
    """The builder's keyword-only parameters a user may set (``fixed`` ones the registry sets)."""
    fixed = set(fixed)
    # get_type_hints resolves the string annotations left by `from __future__ import annotations`
    hints = typing.get_type_hints(builder, include_extras=True)
    params = {}
    for name, param in inspect.signature(builder).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in fixed:
            params[name] = param.replace(annotation=hints.get(name, Any))
    return params


def check_args(model: str, builder: Callable[..., Any], args: dict[str, Any],
               fixed: Iterable[str] = ()) -> dict[str, Any]:
    """The validated (pydantic-coerced) arguments, or :class:`BadArgs` saying what is allowed."""
    params = user_parameters(builder, fixed)
    allowed = ", ".join(params) or "(none)"
    out = {}
    for key, value in args.items():
        if key not in params:
            raise BadArgs(f"unknown argument {key!r} for model {model}; allowed: {allowed}")
        annotation = params[key].annotation
        try:
            out[key] = TypeAdapter(annotation).validate_python(value)
        except ValidationError as err:
            reason = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise BadArgs(f"{key}={value!r} is not valid for model {model} ({reason}); "
                          f"allowed: {key}: {describe(annotation)}") from None
    return out


def describe(annotation: Any) -> str:
    """Human text for an argument annotation: ``Probability`` → ``float >= 0.0 and < 1.0``."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        bounds = [_bound_text(m) for extra in extras for m in _metadata(extra)]
        text = describe(base)
        return f"{text} {' and '.join(b for b in bounds if b)}".strip()
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        return f"list of {describe(inner[0])}" if inner else "list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else describe(a)
                           for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _metadata(extra: Any) -> list[Any]:
    # pydantic's Field(ge=...) stores its bounds as annotated_types objects in .metadata
    return list(getattr(extra, "metadata", [extra]))


def _bound_text(meta: Any) -> str:
    for cls, op, attr in ((annotated_types.Ge, ">=", "ge"), (annotated_types.Gt, ">", "gt"),
                          (annotated_types.Le, "<=", "le"), (annotated_types.Lt, "<", "lt")):
        if isinstance(meta, cls):
            return f"{op} {getattr(meta, attr)}"
    return ""
