"""Typed validation of user configs (YAML/JSON) against dataclasses, before any work starts.

Why: a typo or a wrong type in a config file should cost one line of error at start-up, not a crash in
grid cell 37 an hour later. ``from_mapping(cls, raw, where)`` checks the keys of ``raw`` against the
fields of dataclass ``cls`` (unknown keys get the closest valid name), required fields, and the type of
every value against the field's annotation — ``int``, ``float`` (ints accepted), ``bool`` (strictly),
``str``, ``list[X]``, ``dict[str, X]``, unions/``None``, ``Literal`` and nested dataclasses — naming
the offending item by its path (``teacher.train.epochs``, ``shots[2]``).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from graftkd.errors import GraftkdError

T = TypeVar("T")


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if annotation is Any:
        return "anything"
    if annotation is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        plural = {int: "integers", float: "numbers", bool: "true/false values", str: "strings", Any: "values"}
        return f"a list of {plural.get(item, _describe(item))}"
    if origin is dict:
        _, value = get_args(annotation) or (str, Any)
        return f"a mapping of names to {_describe(value)}"
    if dataclasses.is_dataclass(annotation):
        return f"a mapping ({', '.join(f.name for f in dataclasses.fields(annotation))})"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(annotation,
                                                                                           getattr(annotation, "__name__", str(annotation)))


def _printable(key: Any) -> str:
    """A key as typed, or its repr when it holds newlines or other unprintable characters (one-line errors)."""
    text = str(key)
    return text if text.isprintable() else repr(text)[1:-1]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _matches(value: Any, annotation: Any) -> bool:
    """Cheap structural test used to pick a union member; full checking happens in ``_check``."""
    origin = get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(annotation))
    if origin is list:
        return isinstance(value, list)
    if origin is dict or dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _check(value: Any, annotation: Any, path: str, where: str) -> Any:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            if _matches(value, member):
                return _check(value, member, path, where)
        raise GraftkdError(f"{where}: {path} must be {_describe(annotation)}, got {_shown(value)}")
    if not _matches(value, annotation):
        raise GraftkdError(f"{where}: {path} must be {_describe(annotation)}, got {_shown(value)}")
    if annotation is float:
        return float(value)
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        return [_check(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = get_args(annotation) or (str, Any)
        checked = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise GraftkdError(f"{where}: {path} has a key {_shown(key)} that is not a string")
            checked[key] = _check(v, item, f"{path}.{_printable(key)}", where)
        return checked
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, where, prefix=f"{path}.")
    return value


def from_mapping(cls: type[T], raw: Any, where: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``raw`` after checking keys and types; errors name ``where`` + the key path."""
    if not isinstance(raw, dict):
        what = prefix.rstrip(".") or "the file"
        raise GraftkdError(f"{where}: {what} must be a mapping of keys to values, got {_shown(raw)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise GraftkdError(f"{where}: unknown key '{prefix}{_printable(key)}'{hint}; valid keys: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise GraftkdError(f"{where}: missing required key(s) {', '.join(prefix + m for m in missing)}")
    values = {key: _check(value, hints[key], prefix + key, where) for key, value in raw.items()}
    return cls(**values)


def schema_lines(cls: type, prefix: str = "") -> list[str]:
    """``key: type [= default]`` lines for docs and error help."""
    hints = get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = "" if f.default is dataclasses.MISSING else f" = {f.default!r}"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = " (required)"
        lines.append(f"{prefix}{f.name}: {_describe(hints[f.name])}{default}")
    return lines





def _parsed(raw: str) -> Any:
    """A ``--set`` value as YAML reads it (``64000``, ``true``, ``[1, 2]``, ``{a: 1}``); ``1e-3`` as a float."""
    import yaml

    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads an exponent without a dot (1e-3) as a string
    return value


def with_overrides(roots: dict[str, Any], assignments: list[str], where: str = "--set") -> dict[str, Any]:
    """Apply ``PATH=VALUE`` assignments to named dataclass instances, e.g. ``derive.recipe.samples=64000`` to
    ``{"derive": DeriveOptions(...), "graft": GraftConfig(...)}``; returns the new instances (the old ones are
    not changed). Each value is checked against its field's annotation as a config file's would be, an unknown
    name gets the closest valid one, and the dataclasses' own checks (``__post_init__``) run on the result."""
    roots = dict(roots)
    for text in assignments:
        path, sep, raw = text.partition("=")
        path = path.strip()
        if not sep or not path:
            raise GraftkdError(f"{where} '{text}': write PATH=VALUE, e.g. {next(iter(roots), 'derive')}.recipe.samples=64000")
        parts = path.split(".")
        if parts[0] not in roots:
            close = difflib.get_close_matches(parts[0], list(roots), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise GraftkdError(f"{where} {path}: unknown group '{parts[0]}'{hint}; the groups are {', '.join(roots)}")
        try:
            roots[parts[0]] = _replace_at(roots[parts[0]], parts[1:], _parsed(raw), parts[0], where)
        except GraftkdError as exc:
            message = str(exc)
            raise GraftkdError(message if message.startswith(where) else f"{where} {text.strip()}: {message}") from None
    return roots


def _replace_at(obj: Any, parts: list[str], value: Any, path: str, where: str) -> Any:
    if isinstance(obj, dict) and len(parts) == 1:  # a free-form options mapping, e.g. derive.loss_options.temperature
        return {**obj, parts[0]: value}
    if not dataclasses.is_dataclass(obj):
        raise GraftkdError(f"{where} {path}.{'.'.join(parts)}: {path} is a single setting, not a group")
    fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
    if not parts:
        raise GraftkdError(f"{where} {path}: a group of settings; name one of its keys: {', '.join(fields)}")
    name = parts[0]
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise GraftkdError(f"{where}: unknown key '{path}.{name}'{hint}; valid keys: {', '.join(fields)}")
    here = f"{path}.{name}"
    current = getattr(obj, name)
    if len(parts) > 1:
        new = _replace_at(current, parts[1:], value, here, where)
    elif dataclasses.is_dataclass(current):
        raise GraftkdError(f"{where} {here}: a group of settings; set one of its keys, e.g. {here}."
                           f"{dataclasses.fields(current)[0].name}=...")
    else:
        new = _check(value, get_type_hints(type(obj))[name], here, where)
    return dataclasses.replace(obj, **{name: new})


# ---------------------------------------------------------------------------------------------------------------
# Command-line options from the same dataclasses: a field that carries ``option(...)`` metadata becomes an option
# of a command, so its name, type, choices, default and help are declared once, where the setting lives.

@dataclasses.dataclass(frozen=True)
class Option:
    """How a dataclass field appears on the command line."""

    help: str
    flag: str | None = None  # default: --field-name; a True-by-default bool takes --no-field-name
    words: tuple[str, ...] | dict[str, Any] | None = None  # allowed words, or words -> the field's values
    metavar: str | None = None


def option(help: str, *, flag: str | None = None, words: tuple[str, ...] | dict[str, Any] | None = None,
           metavar: str | None = None) -> dict:
    """Field metadata making the field a command-line option: ``field(default=..., metadata=option("..."))``."""
    return {"option": Option(help, flag, words, metavar)}


def _comma_list(item: type, scalar_if_one: bool = False):
    def parse(text: str):
        parts = [item(p) for p in text.split(",") if p.strip()]
        return parts[0] if scalar_if_one and len(parts) == 1 else parts

    parse.__name__ = f"comma-separated {item.__name__}"  # argparse names the type in its error message
    return parse


def _value_type(annotation: Any):
    """The argparse ``type`` for a field's annotation: int, float, a comma list, or None (a string)."""
    if annotation in (int, float):
        return annotation
    if get_origin(annotation) in (list, Sequence):
        (item,) = get_args(annotation)
        return _comma_list(item) if item in (int, float) else None
    if get_origin(annotation) in (Union, types.UnionType):  # X | Sequence[X]: one value or a list of them
        members = [a for a in get_args(annotation) if a is not type(None)]
        scalars = [a for a in members if a in (int, float)]
        lists = [a for a in members if get_origin(a) in (list, Sequence) and get_args(a) == tuple(scalars[:1])]
        if len(scalars) == 1 and lists:
            return _comma_list(scalars[0], scalar_if_one=True)
    return None


def _options(cls: type, path: str = "") -> list[tuple[str, dataclasses.Field, Any, Option]]:
    """(dotted path, field, annotation, Option) of every field with an option, nested dataclasses included."""
    hints = get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            found += _options(annotation, f"{path}{f.name}.")
        elif "option" in f.metadata:
            found.append((path + f.name, f, annotation, f.metadata["option"]))
    return found


def _flag(f: dataclasses.Field, spec: Option) -> str:
    if spec.flag:
        return spec.flag
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _dest(f: dataclasses.Field, flag: str) -> str:
    """Where argparse puts the option: its name (``--refine-loss``: ``refine_loss``); a negated switch
    (``--no-flip``) under the field's name, holding the field's value (False when given)."""
    return f.name if flag.startswith("--no-") else flag.lstrip("-").replace("-", "_")


def _default(f: dataclasses.Field, spec: Option, defaults: dict[str, Any], path: str) -> Any:
    """The field's default as the command line would write it (a command may have its own, ``defaults``)."""
    if path in defaults:
        return defaults[path]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(spec.words, dict):  # the word that stands for the default
        return next(word for word, value in spec.words.items() if value == default)
    return default


def add_options(parser: Any, cls: type, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                defaults: dict[str, Any] | None = None) -> None:
    """Add the options ``cls`` declares to an argparse ``parser`` (or an argument group of one; ``only``: just
    these field paths, so that one class's options can go to several groups). Every option's default is None,
    meaning "not given": the dataclass's own default, or the command's own in ``defaults`` (by field path), is
    the one its help states and :func:`fill_defaults` sets."""
    for path, f, annotation, spec in _options(cls):
        if path in skip or (only is not None and path not in only):
            continue
        flag = _flag(f, spec)
        if get_origin(annotation) in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            annotation = members[0] if len(members) == 1 else annotation
        help = spec.help
        switch = annotation is bool and spec.words is None
        if "default" not in help and not switch:  # said from the field, so it cannot drift
            default = _default(f, spec, defaults or {}, path)
            help += f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
        kwargs: dict[str, Any] = {"dest": _dest(f, flag), "default": None, "help": help}
        if switch:
            kwargs["action"] = "store_const"
            kwargs["const"] = not flag.startswith("--no-")
        else:
            if spec.words is not None:
                kwargs["choices"] = list(spec.words)
            elif _value_type(annotation) is not None:
                kwargs["type"] = _value_type(annotation)
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        parser.add_argument(flag, **kwargs)


def given_options(args: Any, cls: type, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options of ``cls`` that the command line gave, as a nested mapping for :func:`from_mapping`
    (``{"fade": 0.25, "recipe": {"samples": 64000}}``); an option's words become the field's values."""
    given: dict[str, Any] = {}
    for path, f, _annotation, spec in _options(cls):
        value = getattr(args, _dest(f, _flag(f, spec)), None)
        if path in skip or value is None:
            continue
        if isinstance(spec.words, dict):
            value = spec.words[value]
        *groups, name = path.split(".")
        target = given
        for group in groups:
            target = target.setdefault(group, {})
        target[name] = value
    return given


def build_options(args: Any, cls: type[T], where: str = "the command line", **fixed: Any) -> T:
    """``cls`` from the options the command line gave (others keep their defaults) and the ``fixed`` values."""
    return from_mapping(cls, {**given_options(args, cls), **fixed}, where)


def fill_defaults(args: Any, cls: type, *, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Set every option of ``cls`` the command line did not give to its default (the command's own in
    ``defaults``, else the field's); options in ``skip`` stay None: the command resolves those itself."""
    for path, f, _annotation, spec in _options(cls):
        flag = _flag(f, spec)
        dest = _dest(f, flag)
        if path in skip or getattr(args, dest, None) is not None or flag.startswith("--no-"):
            continue  # a negated switch not given: None, the field keeps its default
        setattr(args, dest, _default(f, spec, defaults or {}, path))
