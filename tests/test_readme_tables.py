"""The README's command and configuration tables against the code (issue #28): every verb of the
CLI has its row, every config key of the pydantic models is named in its section's row, and
neither table names what does not exist — so they cannot drift apart again."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from raykd.cli import build_parser
from raykd.config import RaykdConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _table(header: str) -> list[list[str]]:
    """The rows (cells) of the README table whose header line is ``header``."""
    lines = README.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip() for c in cells])
    return rows


def _outside_parentheses(text: str) -> str:
    depth, out = 0, []
    for ch in text:
        depth += ch == "("
        if depth == 0:
            out.append(ch)
        depth -= ch == ")" and depth > 0
    return "".join(out)


def _section_model(annotation) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        return None  # a list of models (losses, students, augment): documented with its items
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key of a section, a nested section's as ``outer.inner``."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        inner = _section_model(field.annotation)
        out |= _keys(inner, f"{prefix}{name}.") if inner else {prefix + name}
    return out


def test_config_table_names_every_key_of_every_section():
    documented = {}
    for section, keys in _table("| section | keys |"):
        # keys are the backticked names outside parentheses (inside: values and remarks)
        documented[section.strip("`")] = set(re.findall(r"`([a-z_.]+)`",
                                                        _outside_parentheses(keys)))
    expected = {name: _keys(_section_model(field.annotation))
                for name, field in RaykdConfig.model_fields.items()}
    assert sorted(documented) == sorted(expected)
    for section, keys in expected.items():
        assert documented[section] == keys, (
            f"{section}: missing from the README {sorted(keys - documented[section])}, "
            f"not in the config {sorted(documented[section] - keys)}")


def test_command_table_lists_exactly_the_clis_verbs():
    rows = _table("| command | what it does |")
    listed = [re.match(r"`raykd ([a-z-]+)", command).group(1) for command, _ in rows]
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert sorted(listed) == sorted(sub.choices)


def test_command_table_names_only_flags_the_verb_has():
    rows = _table("| command | what it does |")
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    for command, _ in rows:
        verb = re.match(r"`raykd ([a-z-]+)", command).group(1)
        flags = {s for a in sub.choices[verb]._actions for s in a.option_strings}
        assert set(re.findall(r"--[a-z-]+", command)) <= flags, command
