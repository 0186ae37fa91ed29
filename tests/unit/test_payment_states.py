import pytest

from connector.errors import IllegalTransition
from connector.payments.states import (
    CORRECTIONS,
    EVENT_FOR_STATE,
    TERMINAL,
    TRANSITIONS,
    PaymentState,
    can_transition,
    check_transition,
    mermaid_diagram,
)

S = PaymentState


def test_every_state_has_an_event_and_an_entry() -> None:
    assert set(TRANSITIONS) == set(PaymentState)
    assert set(EVENT_FOR_STATE) == set(PaymentState)
    assert all(e.startswith("payment.") for e in EVENT_FOR_STATE.values())


def test_terminal_states_have_no_exit() -> None:
    assert {
        S.REFUNDED,
        S.RELEASED,
        S.FAILED,
        S.REJECTED,
        S.VOIDED,
        S.EXPIRED,
        S.SIMULATED,
        S.RECLAIMED,
    } == TERMINAL
    for state in TERMINAL:
        for target in PaymentState:
            # only the reconciler's correction from on-chain evidence leaves a final state
            assert can_transition(state, target) == ((state, target) in CORRECTIONS)
    assert {(S.FAILED, S.SETTLED), (S.FAILED, S.AUTHORIZED), (S.FAILED, S.CAPTURED)} == CORRECTIONS


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.CREATED, S.SETTLED),  # cannot skip authorization
        (S.SETTLED, S.VOIDED),  # money moved: only a refund can undo it
        (S.AUTHORIZED, S.REFUNDING),
        (S.SETTLING, S.VOIDED),  # outcome unknown: must reconcile, not void
        (S.REQUIRES_APPROVAL, S.SETTLING),
        (S.RELEASED, S.REFUNDING),
    ],
)
def test_illegal_edges_raise_409(current: PaymentState, target: PaymentState) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition("pay_x", current, target)
    assert info.value.status == 409
    assert info.value.context["current"] == current.value


def test_every_non_terminal_state_is_reachable_from_created() -> None:
    seen = {S.CREATED}
    frontier = [S.CREATED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(PaymentState)


def test_diagram_lists_every_edge() -> None:
    text = mermaid_diagram()
    edges = sum(len(t) for t in TRANSITIONS.values())
    assert text.count(" --> ") == edges + 1 + len(TERMINAL)
    assert "settling --> settled" in text
