from pathlib import Path

from connector.payments.states import PaymentState, mermaid_diagram

DOC = Path(__file__).resolve().parents[2] / "docs" / "state-machine.md"


def test_state_machine_doc_shows_the_current_table() -> None:
    text = DOC.read_text()
    assert mermaid_diagram() in text
    for state in PaymentState:
        assert f"| `{state.value}` |" in text
