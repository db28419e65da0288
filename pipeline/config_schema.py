"""Typed configs, checked at the door: one schema per config kind, derived from its dataclasses.

A `Schema` turns the config dataclasses (LabelConfig, TrainConfig, CurateConfig, ...) into
pydantic models in strict mode, with unknown keys forbidden, and validates the raw mapping read
from YAML against them. So a field added to a dataclass with a type annotation is checked without
any edit here, and:

- strings are never coerced: `incremental: "false"`, `limit_rows_per_input: "ten"` and
  `num_gpus_per_actor: "1"` are errors, as is `true` for an integer (an integer is accepted for a
  number);
- every error is reported, each naming its key path (`resources.rows_per_shard: expected an
  integer, got 'lots'`, `inputs[1].path: missing required key`, `modle: unknown key; did you
  mean 'model'?`).

pydantic (v2, a dependency of Ray already) is used as the validator only: the config objects are
still the plain dataclasses, built from the user's own values (an integer written for a number
stays an integer, so config hashes are unchanged). `overrides` refine the annotation of one field
for validation: a `dict` field that really holds another dataclass's fields (`model.backbone` is a
BackboneSpec), an enum (`Literal[...]`) or a range (`Annotated[int, Field(ge=1)]`).

The semantic checks (files exist, the backbone resolves, ...) stay with each config module; they
run on the best-effort object `Schema.build` makes (keys with type errors left at their
defaults), so they are reported together with the type errors.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic
from pydantic import ConfigDict

STRICT = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

Loc = tuple[str | int, ...]


class ConfigErrors(ValueError):
    """Every problem of a config at once; `errors` holds one line per problem, each naming its key."""

    def __init__(self, errors: Iterable[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__(format_errors(self.errors))


def format_errors(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} errors:\n" + "\n".join(f"  - {e}" for e in errors)


def key_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def one_of(*values: str) -> Any:
    """An enum for a schema override: `Literal[values]`."""
    return typing.Literal.__getitem__(values)


def list_of(tp: Any) -> Any:
    """`list[tp]` for a schema override built at run time (an enum's items)."""
    return list[tp]


def at_least(low: float, tp: type = int) -> Any:
    """A range for a schema override: an integer (or `tp`) >= low."""
    return typing.Annotated[tp, pydantic.Field(ge=low)]


# ---- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """One config kind. `root` is the dataclass the config becomes; `overrides` maps
    (dataclass, field name) to the annotation validated instead of the field's own (a dataclass
    for a `dict` field that holds its fields, an enum, a range)."""

    kind: str
    root: type
    overrides: Mapping[tuple[type, str], Any] = field(default_factory=dict)
    sections_may_be_null: bool = True  # `model:` with nothing under it means the defaults

    # -- validation

    def type_errors(self, data: Any) -> tuple[list[str], list[Loc]]:
        """(messages, error locations) of the raw mapping against the schema; ([], []) when valid."""
        if not isinstance(data, dict):
            return [f"config: expected a mapping at the top level, got {_show(data)}"], [()]
        data = self.normalise(data)
        try:
            self.model().model_validate(data)
        except pydantic.ValidationError as e:
            return _messages(e.errors(), data, self.model())
        return [], []

    def normalise(self, data: dict) -> dict:
        """A null section (a dataclass-typed key with nothing under it) takes its default."""
        if not self.sections_may_be_null:
            return data
        return _null_sections(self.root, data, self.overrides)

    def model(self) -> type[pydantic.BaseModel]:
        return _model(self.root, _freeze(self.overrides))

    def build(self, data: dict, bad: Iterable[Loc] = ()) -> Any:
        """The dataclass instance from the user's values, with keys that failed type checks removed
        (so they take their defaults); None when a required key is missing or broken."""
        data = copy.deepcopy(self.normalise(data))
        for loc in bad:
            _prune(self.root, data, loc, self.overrides)
        try:
            return _build(self.root, data)
        except (TypeError, ValueError, KeyError):
            return None

    # -- documentation

    def keys(self) -> list[str]:
        """Every key path of this config kind: `resources.rows_per_shard`, `inputs[].path`, ..."""
        return sorted(_keys(self.root, "", self.overrides))


def _freeze(overrides: Mapping[tuple[type, str], Any]) -> tuple:
    return tuple(sorted(overrides.items(), key=lambda kv: (kv[0][0].__qualname__, kv[0][1])))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _field_annotation(cls: type, name: str, overrides: Mapping[tuple[type, str], Any]) -> Any:
    return overrides.get((cls, name), _hints(cls)[name])


_MODELS: dict[tuple, type[pydantic.BaseModel]] = {}


def _model(cls: type, overrides: tuple) -> type[pydantic.BaseModel]:
    """A strict pydantic model with the dataclass's fields (nested dataclasses become models too)."""
    key = (cls, overrides)
    if key not in _MODELS:
        ov = dict(overrides)
        spec: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            ann = _translate(_field_annotation(cls, f.name, ov), overrides)
            if f.default is not dataclasses.MISSING:
                spec[f.name] = (ann, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                spec[f.name] = (ann, pydantic.Field(default_factory=f.default_factory))
            else:
                spec[f.name] = (ann, ...)
        _MODELS[key] = pydantic.create_model(cls.__name__, __config__=STRICT, **spec)
    return _MODELS[key]


def _translate(ann: Any, overrides: tuple) -> Any:
    """The annotation with every dataclass in it replaced by its strict model."""
    if isinstance(ann, type) and dataclasses.is_dataclass(ann):
        return _model(ann, overrides)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is None or not args:
        return ann
    if origin is typing.Annotated:
        return typing.Annotated[(_translate(args[0], overrides), *ann.__metadata__)]
    if origin is typing.Literal:
        return ann
    new = tuple(_translate(a, overrides) for a in args)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[new]  # noqa: UP007 - built from a tuple of types
    return origin[new] if len(new) > 1 else origin[new[0]]


def _dataclass_of(ann: Any) -> type | None:
    """The dataclass a (possibly Optional / Annotated) annotation names, else None."""
    if isinstance(ann, type) and dataclasses.is_dataclass(ann):
        return ann
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _dataclass_of(args[0])
    if origin in (typing.Union, types.UnionType):
        found = [d for d in (_dataclass_of(a) for a in args if a is not type(None)) if d is not None]
        return found[0] if len(found) == 1 else None
    return None


def _list_item_dataclass(ann: Any) -> type | None:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _list_item_dataclass(args[0])
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if (d := _list_item_dataclass(a)) is not None:
                return d
        return None
    if origin is list and args:
        return _dataclass_of(args[0])
    return None


def _null_sections(cls: type, data: dict, overrides: Mapping[tuple[type, str], Any]) -> dict:
    out = dict(data)
    for f in dataclasses.fields(cls):
        ann = _field_annotation(cls, f.name, overrides)
        nullable = type(None) in typing.get_args(ann)
        sub = None if nullable else _dataclass_of(ann)
        if sub is not None and f.name in out:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if out[f.name] is None and has_default:
                del out[f.name]  # the section's default
            elif isinstance(out[f.name], dict):
                out[f.name] = _null_sections(sub, out[f.name], overrides)
    return out


def _build(cls: type, data: dict):
    """The dataclass from the values as written (nested dataclass sections built recursively)."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, sub = data[f.name], _dataclass_of(hints[f.name])
        kwargs[f.name] = _build(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _prune(cls: type, data: dict, loc: Loc, overrides: Mapping[tuple[type, str], Any]) -> None:
    """Remove the dataclass field a type error is in (its default then applies). Errors inside a
    field with an override (an input spec, the backbone) are left to that field's own checks."""
    node: Any = data
    current: type | None = cls
    for i, part in enumerate(loc):
        if current is None or not isinstance(node, dict) or not isinstance(part, str):
            return
        if (current, part) in overrides:
            return
        names = {f.name for f in dataclasses.fields(current)}
        if part not in names:  # an unknown key
            node.pop(part, None)
            return
        sub = _dataclass_of(_hints(current)[part])
        if sub is None or i == len(loc) - 1 or not isinstance(node.get(part), dict):
            node.pop(part, None)
            return
        node, current = node[part], sub


def _keys(cls: type, prefix: str, overrides: Mapping[tuple[type, str], Any]) -> set[str]:
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        ann = _field_annotation(cls, f.name, overrides)
        sub, item = _dataclass_of(ann), _list_item_dataclass(ann)
        if sub is not None:
            out |= _keys(sub, path + ".", overrides)
        elif item is not None:
            out.add(path)
            out |= _keys(item, path + "[].", overrides)
        else:
            out.add(path)
    return out


# ---- messages --------------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "null",
    "tuple_type": "a list",
    "set_type": "a list",
}
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _walk(loc: Loc, data: Any, keep_last: bool) -> tuple[list[str | int], list[str], Any]:
    """Split pydantic's location into the key path in the user's data and the union member tags
    on the way (pydantic names the member of an `int | list[int]` it tried: 'int', 'list[int]');
    a part is a key when the data at that point holds it. Returns (path, tags, value at path)."""
    path: list[str | int] = []
    tags: list[str] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and (part in node or (last and keep_last)):
            path.append(part)
            node = node.get(part)
        elif last and keep_last:
            path.append(part)
            node = None
        else:
            tags.append(str(part))
    return path, tags, node


def _one(err: Any, where: str, value: Any, allowed: Callable[[], list[str]]) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    if t == "missing":
        return f"{where}: missing required key"
    if t == "extra_forbidden":
        name = where.rsplit(".", 1)[-1].split("[")[0]
        keys = allowed()
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{where}: unknown key{hint} (allowed: {', '.join(keys)})"
    if t in _EXPECTED:
        return f"{where}: expected {_EXPECTED[t]}, got {_show(value)}"
    if t == "literal_error":
        return f"{where}: expected one of {ctx.get('expected')}, got {_show(value)}"
    if t == "string_too_short":
        return f"{where}: expected a non-empty string, got {_show(value)}"
    if t == "too_short":
        return f"{where}: expected at least {ctx.get('min_length')} item(s), got {_show(value)}"
    if t in _BOUNDS:
        op, k = _BOUNDS[t]
        return f"{where}: expected a value {op} {ctx.get(k)}, got {_show(value)}"
    return f"{where}: {err['msg']}, got {_show(value)}"


def _expected_of(err: Any) -> str:
    t = err["type"]
    if t in _EXPECTED:
        return _EXPECTED[t]
    if t == "literal_error":
        return f"one of {(err.get('ctx') or {}).get('expected')}"
    return err["msg"].removeprefix("Input should be ").removeprefix("a valid ")


def _allowed_keys(path: list[str | int], model: type[pydantic.BaseModel]) -> list[str]:
    """The keys the mapping at `path[:-1]` allows, from the model tree."""
    m: Any = model
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        fld = m.model_fields.get(part) if isinstance(m, type) and issubclass(m, pydantic.BaseModel) else None
        if fld is None:
            return []
        m = _model_in(fld.annotation)
        if m is None:
            return []
    return sorted(m.model_fields) if isinstance(m, type) and issubclass(m, pydantic.BaseModel) else []


def _model_in(ann: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
        return ann
    for a in typing.get_args(ann):
        if (m := _model_in(a)) is not None:
            return m
    return None


def _messages(errors: list[Any], data: dict, model: type[pydantic.BaseModel]) -> tuple[list[str], list[Loc]]:
    """One message per problem. The members of a union that all failed give one message
    (`expected an integer or a list, got 'two'`), unless a member went deeper into the value
    (a list with one bad item): then that item's error is the one reported."""
    found: list[tuple[Loc, str]] = []

    def add(path: list[str | int], err: Any, value: Any) -> None:
        msg = _one(err, key_path(path), value, lambda: _allowed_keys(path, model))
        if all(msg != m for _, m in found):
            found.append((tuple(path), msg))

    # A union's members, by the key path of the union: (path, error, value) of each member's error.
    unions: dict[Loc, list[tuple[list[str | int], Any, Any]]] = {}
    order: list[tuple[Loc | None, tuple[list[str | int], Any, Any] | None]] = []
    for err in errors:
        loc = tuple(err["loc"])
        path, tags, value = _walk(loc, data, keep_last=err["type"] in ("missing", "extra_forbidden"))
        if tags:
            union_at: Loc = tuple(path[: _prefix_len(loc, path)])
            if union_at not in unions:
                unions[union_at] = []
                order.append((union_at, None))
            unions[union_at].append((path, err, value))
        else:
            order.append((None, (path, err, value)))
    for at, single in order:
        if single is not None:
            add(*single)
            continue
        assert at is not None
        members = unions[at]
        deep = [m for m in members if len(m[0]) > len(at)]
        for m in deep:
            add(*m)
        if deep:
            continue
        expected: list[str] = []
        for _, e, _ in members:
            if (x := _expected_of(e)) not in expected:
                expected.append(x)
        msg = f"{key_path(at)}: expected {' or '.join(expected)}, got {_show(members[0][2])}"
        if all(msg != m for _, m in found):
            found.append((at, msg))
    return [m for _, m in found], [loc for loc, _ in found]


def _prefix_len(loc: Loc, path: list[str | int]) -> int:
    """How many parts of the key path come before the first union tag."""
    n = 0
    for part in loc:
        if n < len(path) and part == path[n]:
            n += 1
        else:
            break
    return n


def under(locs: Iterable[Loc], *prefix: str | int) -> bool:
    """Whether any error location lies at or under the key path `prefix`."""
    return any(tuple(loc[: len(prefix)]) == prefix for loc in locs)
