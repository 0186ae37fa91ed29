"""Executable docs: the snippets of the user-facing pages run against a live `x402c dev`.

Every fenced ``bash``/``python``/``json`` block in the pages below carries an annotation, an HTML
comment right above it (invisible when rendered)::

    <!-- docs-test: {"expect": ["\\"status\\":\\"succeeded\\""]} -->   run it; output must contain…
    <!-- docs-test: {"skip": "why"} -->                              not runnable here (say why)
    <!-- docs-test: {"json": "ConnectionCreate"} -->                 validate against that model
        (optional "placeholders": {"0x…": "0x11…"} fills a placeholder before validating)
    <!-- docs-test: {"python": {"replace": {...}, "prelude": "...", "append": "..."}} -->

A page's runnable blocks run in order as one bash script (``set -euo pipefail``, variables carry
over between blocks, like a reader's shell) in a scratch directory that has the repository's
``.venv`` and an ``x402c dev`` data directory ``.x402c``. Expectations compare with whitespace
removed, so ``"status": "succeeded"`` in a doc matches compact JSON. A block without an
annotation fails the test: a new snippet is either run or explicitly skipped.

To update a snippet: edit the page, run ``pytest tests/e2e/test_docs_snippets.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from api.stack import free_port
from tests.e2e.test_dev_restart import DevProcess

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["docs/quickstart.md", "docs/admin-api.md", "docs/workflow-builder.md"]
CHECKED_LANGS = {"bash", "sh", "shell", "console", "python", "json", "http"}
_BLOCK = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<ann>\{.*?\})\s*-->\s*\n)?"
    r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```\s*$",
    re.S | re.M,
)
_MARK = "@@docs-block {}@@"
pytestmark = [pytest.mark.chain, pytest.mark.slow]


def _models() -> dict[str, Any]:
    from api.routes.admin import KeyCreate
    from connector.actions.schemas import BalanceInput, ReceiveInput, SendInput
    from connector.connections.schemas import ConnectionCreate, ConnectionUpdate

    return {m.__name__: m for m in (ConnectionCreate, ConnectionUpdate, KeyCreate, SendInput,
                                    ReceiveInput, BalanceInput)}  # fmt: skip


@dataclass
class Block:
    page: str
    index: int
    lang: str
    body: str
    annotation: dict[str, Any] | None
    line: int

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class PageRun:
    returncode: int
    outputs: dict[int, str] = field(default_factory=dict)
    stderr: str = ""
    failures: list[str] = field(default_factory=list)


def parse(page: str, text: str) -> list[Block]:
    blocks = []
    for i, m in enumerate(_BLOCK.finditer(text)):
        lang = m.group("lang").lower()
        if lang not in CHECKED_LANGS:
            continue
        ann = json.loads(m.group("ann")) if m.group("ann") else None
        line = text.count("\n", 0, m.start("body"))
        blocks.append(Block(page, i, lang, m.group("body"), ann, line))
    return blocks


def python_block(block: Block) -> str:
    spec = block.annotation["python"] if block.annotation else {}
    source = block.body
    for old, new in spec.get("replace", {}).items():
        assert old in source, f"{block.where}: replacement target {old!r} not in the snippet"
        source = source.replace(old, new)
    source = "\n".join([spec.get("prelude", ""), source, spec.get("append", "")])
    return f'"$DOCS_PYTHON" - <<\'DOCS_PY_EOF\'\n{source}\nDOCS_PY_EOF'


def script_for(blocks: list[Block]) -> str:
    parts = ["set -euo pipefail", "set -a"]
    for block in blocks:  # a snippet's output may not end with a newline: start markers on one
        parts.append(f"printf '\\n{_MARK.format(block.index)}\\n'")
        parts.append(python_block(block) if block.lang == "python" else block.body)
    parts.append(f"printf '\\n{_MARK.format('end')}\\n'")
    return "\n".join(parts) + "\n"


def normalized(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _without_ports(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ports(v) for k, v in value.items()}
    if isinstance(value, str) and re.match(r"https?://", value):
        url = urlparse(value)
        return url._replace(netloc=url.hostname or "").geturl()
    return value


def check_static(block: Block, workdir: Path | None) -> list[str]:
    """Blocks checked without running: annotations present, JSON bodies valid for their model."""
    if block.annotation is None:
        return [f"{block.where}: ```{block.lang} block has no docs-test annotation"]
    ann = block.annotation
    if "skip" in ann:
        return [] if str(ann["skip"]).strip() else [f"{block.where}: skip needs a reason"]
    if block.lang == "json":
        if "json" not in ann:
            return [f"{block.where}: a json block needs {{\"json\": \"<Model>\"}} or a skip"]
        from pydantic import ValidationError

        body = block.body
        for placeholder, example in ann.get("placeholders", {}).items():
            body = body.replace(placeholder, example)
        try:
            data = json.loads(body)
            _models()[ann["json"]].model_validate(data)
        except (ValueError, ValidationError) as exc:
            return [f"{block.where}: invalid {ann['json']}: {exc}"]
        if ann.get("compare_file") and workdir is not None:
            actual = json.loads((workdir / ann["compare_file"]).read_text())
            if _without_ports(actual) != _without_ports(data):
                return [f"{block.where}: differs from {ann['compare_file']}: {actual}"]
    return []


def runnable(blocks: list[Block]) -> list[Block]:
    return [
        b
        for b in blocks
        if b.annotation is not None and "skip" not in b.annotation and b.lang != "json"
    ]


def run_page(page: str, text: str, workdir: Path, env: dict[str, str]) -> PageRun:
    blocks = parse(page, text)
    failures = [f for b in blocks for f in check_static(b, workdir)]
    run_blocks = runnable(blocks)
    result = subprocess.run(
        ["bash", "-c", script_for(run_blocks)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outputs: dict[int, str] = {}
    current: int | None = None
    for line in result.stdout.splitlines():
        marker = re.fullmatch(r"@@docs-block (\d+|end)@@", line)
        if marker:
            current = int(marker.group(1)) if marker.group(1) != "end" else None
            if current is not None:
                outputs[current] = ""
            continue
        if current is not None:
            outputs[current] += line + "\n"
    run = PageRun(result.returncode, outputs, result.stderr, failures)
    for block in run_blocks:
        if block.index not in outputs:
            if result.returncode == 0:
                run.failures.append(f"{block.where}: no output recorded for this block")
            continue
        for expected in block.annotation.get("expect", []) if block.annotation else []:
            if normalized(expected) not in normalized(outputs[block.index]):
                run.failures.append(
                    f"{block.where}: expected {expected!r} in the output:\n{outputs[block.index]}"
                )
    if result.returncode != 0:
        last = max(outputs, default=None)
        failed = next((b for b in run_blocks if b.index == last), None)
        run.failures.append(
            f"{failed.where if failed else page}: the snippet failed (exit {result.returncode})"
            f"\nstdout:\n{outputs.get(last, '') if last is not None else ''}"
            f"\nstderr:\n{result.stderr[-3000:]}"
        )
    return run


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A scratch 'repository root': the real .venv, and `x402c dev` on .x402c in it."""
    workdir = tmp_path_factory.mktemp("docs")
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()
    dev = DevProcess(None, port, free_port(), cwd=workdir)  # default data dir, as a user runs it
    try:
        dev.wait_ready()
        env = {k: v for k, v in os.environ.items() if not k.startswith("X402C_")}
        env.update(
            API=f"http://127.0.0.1:{port}",
            DOCS_PYTHON=sys.executable,
            PYTHONPATH=str(ROOT),
            PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}",
        )
        yield workdir, env
    finally:
        dev.stop(15)


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_work(page: str, dev_stack: tuple[Path, dict[str, str]]) -> None:
    workdir, env = dev_stack
    run = run_page(page, (ROOT / page).read_text(), workdir, env)
    assert run.failures == [], "\n\n".join(run.failures)
    assert run.returncode == 0


def test_every_snippet_is_annotated_and_some_run() -> None:
    for page in PAGES:
        blocks = parse(page, (ROOT / page).read_text())
        missing = [b.where for b in blocks if b.annotation is None]
        assert missing == [], f"annotate these blocks (run or skip with a reason): {missing}"
        assert runnable(blocks), f"{page} has no runnable snippet"


def test_a_changed_command_or_field_fails(dev_stack: tuple[Path, dict[str, str]]) -> None:
    """The harness is not a rubber stamp: break the quickstart three ways, each is caught."""
    workdir, env = dev_stack
    text = (ROOT / "docs" / "quickstart.md").read_text()
    renamed_action = text.replace("/actions/balance?", "/actions/balances?")
    run = run_page("quickstart", renamed_action, workdir, env)
    assert any('"status":"succeeded"' in f for f in run.failures), run.failures
    renamed_field = text.replace('"rpc_url": "http://127.0.0.1:8545"', '"rpc": "x"')
    assert any("invalid ConnectionCreate" in f for f in run_page("q", renamed_field, workdir,
                                                                  env).failures)  # fmt: skip
    bad_command = text.replace("connections list", "connection list")
    assert any("the snippet failed" in f for f in run_page("q", bad_command, workdir, env).failures)


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) pairs of the admin-api.md table: every method with every path of a row."""
    pairs = set()
    for line in (ROOT / "docs" / "admin-api.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"[A-Z]+( / [A-Z]+)*", cells[0]):
            continue
        paths = [p.split("?")[0] for p in re.findall(r"`([^`]+)`", cells[1])]
        for method in cells[0].split(" / "):
            pairs |= {(method, "/v1/admin" + p) for p in paths}
    return pairs


def test_admin_api_table_matches_the_routes() -> None:
    from api.app import create_app
    from connector.settings import Settings
    from connector.vault import MasterKeyRing

    app = create_app(Settings(master_keys=MasterKeyRing.generate_spec("t1"),
                              database_url="sqlite://"))  # fmt: skip
    served = {
        (method.upper(), re.sub(r"\{[^}]+\}", "{id}", path))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    documented = {(m, re.sub(r"\{[^}]+\}", "{id}", p)) for m, p in documented_routes()}
    assert len(documented) > 20
    assert documented - served == set(), "documented but not served"
    admin = {pair for pair in served if pair[1].startswith("/v1/admin/")}
    assert admin - documented == set(), "served but not documented"
