"""Reading YAML configs: safe loading, ``--set`` overrides, and errors with file, line and field.

The schemas themselves live next to what they configure (``losslab.train.config``); this
module only knows YAML and pydantic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from losslab.errors import UserError
from losslab.files import read_utf8

M = TypeVar("M", bound=BaseModel)


def _line_index(node: yaml.Node, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, str(key.value))
            if sub in lines:  # safe_load keeps the last silently: almost always a mistake
                raise DuplicateKey(".".join(sub), lines[sub], key.start_mark.line + 1)
            lines[sub] = key.start_mark.line + 1
            lines.update({k: v for k, v in _line_index(value, sub).items() if k != sub})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_index(item, (*path, str(i))))
    return lines


class DuplicateKey(Exception):
    def __init__(self, key: str, first: int, again: int) -> None:
        self.key, self.first, self.again = key, first, again


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Safe-load a YAML mapping; returns it and the line of every key path."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = read_utf8(path, "; save the config as UTF-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
    if not isinstance(data, dict):
        raise UserError("a config must be a YAML mapping of keys to values", where=str(path))
    try:
        return data, (_line_index(node) if node is not None else {})
    except DuplicateKey as dup:
        raise UserError(
            f"field {dup.key!r}: key given twice (also on line {dup.first})", where=f"{path}:{dup.again}"
        ) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars/flow collections)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        target: Any = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
                continue
            if not isinstance(target, dict):
                raise UserError(f"--set {key}: {part!r} is not a mapping in the config")
            target = target.setdefault(part, {})
        last = parts[-1]
        if isinstance(target, list) and last.isdigit() and int(last) < len(target):
            target[int(last)] = value
        elif isinstance(target, dict):
            target[last] = value
        else:
            raise UserError(f"--set {key}: cannot set {last!r} inside a {type(target).__name__}")
    return data


def override_paths(overrides: list[str]) -> dict[tuple[str, ...], str]:
    """The key path each ``--set KEY=VALUE`` sets, mapped to the override as written."""
    return {tuple(item.partition("=")[0].strip().split(".")): item for item in overrides if "=" in item}


def locate(
    loc: tuple[str, ...],
    *,
    source: str,
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: dict[tuple[str, ...], str] | None = None,
) -> str:
    """Where the value at key path ``loc`` came from: ``--set KEY=VALUE`` when an override set it
    (or a mapping around it), else ``FILE:LINE`` of the nearest key written in the file."""
    for path, item in (overridden or {}).items():
        if loc[: len(path)] == path:
            return f"--set {item}"
    line = _nearest_line(lines or {}, loc)
    return f"{source}:{line}" if line else source


def validate(
    schema: type[M],
    data: dict[str, Any],
    *,
    source: str,
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: dict[tuple[str, ...], str] | None = None,
) -> M:
    """Validate ``data`` against ``schema``; errors name the file and line (or the ``--set``
    override) and the field."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            where = locate(loc, source=source, lines=lines, overridden=overridden)
            field = ".".join(loc) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = (
                    f"unknown key (check the spelling; the keys are the fields of {schema.__module__}."
                    f"{schema.__name__} and its sections, described in the docs)"
                )
            problems.append(f"{where}: field {field!r}: {msg}")
        raise UserError("invalid config:\n  " + "\n  ".join(problems)) from None


def _nearest_line(lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


@dataclass
class ConfigFile:
    """A YAML config read and overridden, not yet validated: the mapping, where it came from,
    the line of every key and the key paths ``--set`` changed."""

    data: dict[str, Any]
    source: str
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    overridden: dict[tuple[str, ...], str] = field(default_factory=dict)

    def where(self, *loc: str) -> str:
        """``FILE:LINE: field 'a.b'`` (or ``--set a.b=...: field 'a.b'``) for the key path ``loc``."""
        return (
            f"{locate(loc, source=self.source, lines=self.lines, overridden=self.overridden)}: field {'.'.join(loc)!r}"
        )

    def validate(self, schema: type[M]) -> M:
        return validate(schema, self.data, source=self.source, lines=self.lines, overridden=self.overridden)


def read_config(path: str | Path, overrides: list[str] | None = None) -> ConfigFile:
    """Safe-load a YAML config and apply ``--set`` overrides, keeping the lines and what was overridden."""
    data, lines = load_yaml(path)
    overrides = overrides or []
    return ConfigFile(apply_overrides(data, overrides), str(path), lines, override_paths(overrides))


def load_config(schema: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Load, override and validate a YAML config before any work starts."""
    return read_config(path, overrides).validate(schema)


def checked_output_dir(path: str) -> str:
    """``path`` when it can be an output folder, else a ``ValueError`` saying why (a pydantic
    validator: the config's error then names the file, line and field)."""
    problem = output_dir_problem(path)
    if problem:
        raise ValueError(problem)
    return path


OutputDir = Annotated[str, AfterValidator(checked_output_dir)]
"""A config field naming a folder that losslab writes into."""


def output_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be an output folder (an existing file, under a file, not writable),
    or None when it is one or can be created."""
    if not path:
        return "an empty path; give a folder"
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        return f"{path!r} exists and is not a folder"
    existing = target
    while not existing.exists():  # the nearest existing folder, where mkdir would start
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{path!r} cannot be created: {str(existing)!r} is a file, not a folder"
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"{path!r}: {str(existing)!r} is not writable"
    return None
