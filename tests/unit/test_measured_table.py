"""The READMEs' "Measured" tables are generated from the benches' recorded results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gen() -> ModuleType:
    path = ROOT / "scripts" / "gen_measured.py"
    spec = importlib.util.spec_from_file_location("gen_measured", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["README.md", "bench/README.md"])
def test_readme_tables_match_the_recorded_results(page: str) -> None:
    g = gen()
    text = (ROOT / page).read_text()
    assert g.apply(text, g.render()) == text, f"{page} is stale: run scripts/gen_measured.py"


def test_every_recorded_result_follows_the_shared_format() -> None:
    g = gen()
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files, "no bench has recorded results"
    for path in files:
        doc = g.load(path)
        assert doc["bench"] == path.stem
        assert doc["measured_at"].endswith("Z") or "+00:00" in doc["measured_at"]


def write(folder: Path, name: str, doc: object) -> None:
    (folder / f"{name}.json").write_text(json.dumps(doc))


def test_render_orders_benches_and_formats_rows(tmp_path: Path) -> None:
    g = gen()
    row = {"what": "a|b", "ours": "10/s", "baseline": "5/s", "ratio": 2.0}
    write(tmp_path, "zeta", {"bench": "zeta", "measured_at": "2026-01-02T03:04:05Z", "rows": [row]})
    write(tmp_path, "verify", {"bench": "verify", "measured_at": "2026-01-01T00:00:00Z",
                               "rows": [{**row, "what": "v", "ratio": None}]})  # fmt: skip
    table = g.render(tmp_path)
    lines = table.splitlines()
    body = [line for line in lines if line.startswith("| ") and "bench_" in line]
    assert body[0].startswith("| v |") and "| — |" in body[0]  # preferred order first
    assert "a\\|b" in body[1] and "| 2.00x |" in body[1] and "2026-01-02 03:04" in body[1]
    page = f"intro\n{g.START}\nold table\n{g.END}\noutro\n"
    assert g.apply(page, table) == f"intro\n{table}\noutro\n"


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"bench": "x", "rows": []},
        {"bench": "x", "measured_at": "t", "rows": [{"what": "w", "ours": 1, "baseline": "b"}]},
        {"bench": "x", "measured_at": "t",
         "rows": [{"what": "w", "ours": "o", "baseline": "b", "ratio": "fast"}]},
    ],
)  # fmt: skip
def test_malformed_results_are_refused(tmp_path: Path, doc: object) -> None:
    g = gen()
    write(tmp_path, "x", doc)
    with pytest.raises(g.BadResults):
        g.render(tmp_path)


def test_a_page_without_markers_is_an_error() -> None:
    g = gen()
    with pytest.raises(g.BadResults):
        g.apply("no markers here", g.render())
