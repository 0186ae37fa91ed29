import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_reference_pages_are_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path, build in module.PAGES.items():
        assert (ROOT / path).read_text() == build(), f"{path} is stale: run scripts/gen_docs.py"
