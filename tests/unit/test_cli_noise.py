"""What the CLI prints around its output: no type placeholders in help, no deprecation noise."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from api.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_help_has_no_type_placeholders() -> None:
    runner = CliRunner()
    for args in (["--help"], ["pay", "--help"], ["dev", "--help"]):
        result = runner.invoke(app, args, env={"COLUMNS": "120"}, prog_name="x402c")
        assert result.exit_code == 0, result.output
        assert not re.search(r"<(bool|str|int|path)>|\{url\}", result.output), result.output
    pay = runner.invoke(app, ["pay", "--help"], env={"COLUMNS": "120"}, prog_name="x402c")
    assert "x402c pay [OPTIONS] URL" in pay.output


def test_license_is_an_spdx_string() -> None:
    """A TOML-table license makes setuptools print a deprecation block on every install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in build), build
