from pathlib import Path

from connector.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    missing = [n for n in Settings.model_fields if f"`X402C_{n.upper()}`" not in text]
    assert missing == []
