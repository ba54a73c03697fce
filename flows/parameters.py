"""A flow's parameters, said once: one pydantic model per flow, from which its command line, the flow function's
signature and the deployment form are generated.

* Each field's ``description`` is the option's ``--help`` text and the form's description; its default is
  the command line's default, the signature's and the form's; its type and bounds check the option's value
  as it is given, the call and the form's input.
* The signature is flat, one parameter per field, not one nested object: deployment parameters merge
  shallowly, so ``prefect deployment run everest-production/pbs --param data_dir=...`` keeps the deployment's
  other parameters.
* A field that may be unset (``T | None``, default None) appears in the form as a plain ``T`` input with no
  default, not as a null choice; a field left empty is not sent, and the flow takes the model's None.
* The shared options of :mod:`everest.cli` (``--targets``, ``--data-dir``, ``--config``, ...) keep their flags
  and types on every command line.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema
from pydantic.fields import FieldInfo
from pydantic_core import MISSING

from everest.cli import OPTIONS, add_option, whole_number

# The embedded default data folder: synthetic tables made there when missing. No other folder is ever filled.
DEMO_DATA_DIR = "data/demo"

R = TypeVar("R")


class FlowParameters(BaseModel):
    """Base of a flow's parameter model: validated once, frozen, unknown parameters refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Command-line flags that are not ``--<name with dashes>``, e.g. ``{"space_file": "--space"}``.
    cli_flags: ClassVar[dict[str, str]] = {}

    def flow_parameters(self) -> dict[str, Any]:
        """The flow's keyword arguments: every parameter, as validated."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """One option per field (``args.<field>``), its help the field's description, its default the field's."""
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            help_ = (info.description or "").replace("%", "%%")
            if name in OPTIONS and name not in cls.cli_flags:
                add_option(p, name, default=default, help=help_)
            else:
                flag = cls.cli_flags.get(name, "--" + name.replace("_", "-"))
                p.add_argument(flag, dest=name, default=default, help=help_, **_argument(info, flag, default))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The parameters the options of :meth:`add_arguments` give (a ValidationError names what is wrong)."""
        return cls(**{name: getattr(args, name) for name in cls.model_fields})

    @classmethod
    def signature(cls, **defaults: Any) -> inspect.Signature:
        """The flow function's signature: the fields as keyword parameters, ``defaults`` replacing some defaults.

        Each default is a ``Field`` carrying the description, which Prefect puts in the form. An unset (None)
        default becomes pydantic's MISSING, which the form shows as no default at all.
        """
        params = []
        for name, info in cls.model_fields.items():
            default = defaults.get(name, info.get_default(call_default_factory=True))
            annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            if default is None:
                default, annotation = MISSING, typing.Union[_no_null_choice(info), MISSING]  # noqa: UP007
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=Field(default, description=info.description)))
        return inspect.Signature(params)


def _set_type(info: FieldInfo) -> Any:
    """The T of a field typed ``T | None``; the field's type otherwise."""
    if typing.get_origin(info.annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007 - built from a tuple
    return info.annotation


def _no_null_choice(info: FieldInfo) -> Any:
    """A ``T | None`` field's type, shown in the form as ``T`` alone (with its bounds): an empty input, not a
    choice between T and null. None still validates."""
    shown = _set_type(info)
    schema = TypeAdapter(Annotated[(shown, *info.metadata)] if info.metadata else shown).json_schema()
    return Annotated[(info.annotation, *info.metadata, WithJsonSchema(schema))]


def _argument(info: FieldInfo, flag: str, default: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field that is no shared option, from its type and bounds."""
    kind, metadata = _set_type(info), info.metadata
    if kind is bool:
        return {"action": "store_false" if default else "store_true"}
    if typing.get_origin(kind) is Literal:
        return {"choices": list(typing.get_args(kind))}
    if kind is int:
        ge = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
        le = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
        return {"type": functools.partial(whole_number, ge=ge, le=le), "metavar": "N"}
    return {"metavar": flag.removeprefix("--").upper().replace("-", "_")}


def flow_function(model: type[FlowParameters], body: Callable[[Any], R], name: str, doc: str,
                  **defaults: Any) -> Callable[..., R]:
    """A function for ``prefect.flow`` with :meth:`FlowParameters.signature` as its signature, which builds the
    model from its keyword arguments (unset ones left out) and runs ``body`` on it."""
    def run(**values: Any) -> R:
        return body(model(**{k: v for k, v in values.items() if v is not MISSING}))

    run.__signature__ = model.signature(**defaults)  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = name
    run.__doc__ = doc
    run.__module__ = body.__module__
    return run
