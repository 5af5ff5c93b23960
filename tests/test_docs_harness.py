"""docs/harness.md's field table names every TrainConfig field once, with its real default and a flag that
``sharpness train`` has: a field added without its row, or a default changed without the docs, fails here."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import typer

from sharpness.cli import app
from sharpness.harness import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "harness.md"
ROW = re.compile(r"^\| `(?P<field>\w+)` \| `(?P<default>[^`]+)` \| (?:(?P<flag>`[-\w]+`) )?\| (?P<meaning>[^|]+) \| "
                 r"(?P<omitted>[^|]*)\|$")


def _rows() -> dict[str, re.Match]:
    rows: dict[str, re.Match] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            assert match["field"] not in rows, f"{match['field']} has two rows"
            rows[match["field"]] = match
    return rows


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def test_every_field_has_one_row_with_its_default():
    rows = _rows()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert sorted(rows) == sorted(fields)
    for name, row in rows.items():
        assert ast.literal_eval(row["default"]) == _default(fields[name]), name


def test_every_flag_is_a_train_option_for_its_field():
    command = typer.main.get_command(app).commands["train"]
    flags = {opt: param.name for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    # the flags whose parameter name differs from the field's (a list flag fills a tuple or dict field)
    renamed = {"base_opt": "base_options", "opt": "optimizer_options", "model_opt": "model_options",
               "data_opt": "data_options", "measure": "measures"}
    rows = _rows()
    for name, row in rows.items():
        if name == "world_size":  # set from the process group, not a flag
            assert row["flag"] is None
            continue
        flag = row["flag"].strip("`")
        assert flag in flags, f"{name}: {flag} is not a train option"
        assert renamed.get(flags[flag], flags[flag]) == name, (name, flag)


def test_the_omitted_column_matches_to_dict():
    """A field with an entry in the last column is missing from a default config's to_dict; one without is there."""
    data = TrainConfig().to_dict()
    for name, row in _rows().items():
        assert (name not in data) == bool(row["omitted"].strip()), name
