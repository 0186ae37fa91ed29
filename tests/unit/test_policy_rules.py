import pytest
from pydantic import ValidationError

from connector.errors import PolicyRefused
from connector.policy.rules import Candidate, SpendingPolicy, check_static_rules, needs_approval

PAYEE = "0x1111111111111111111111111111111111111111"
ASSET = "0x2222222222222222222222222222222222222222"


def cand(amount: int = 100, url: str | None = "https://api.example.com/x", **kw: str) -> Candidate:
    return Candidate(
        amount=amount,
        asset=kw.get("asset", ASSET),
        network=kw.get("network", "eip155:31337"),
        payee=kw.get("payee", PAYEE),
        url=url,
    )


@pytest.mark.parametrize(
    ("policy", "candidate", "rule"),
    [
        (SpendingPolicy(max_per_payment="99"), cand(100), "max_per_payment"),
        (SpendingPolicy(allowed_networks=["eip155:8453"]), cand(), "allowed_networks"),
        (SpendingPolicy(allowed_assets=["0x" + "3" * 40]), cand(), "allowed_assets"),
        (SpendingPolicy(payee_deny=[PAYEE.upper().replace("0X", "0x")]), cand(), "payee_deny"),
        (SpendingPolicy(payee_allow=["0x" + "4" * 40]), cand(), "payee_allow"),
        (SpendingPolicy(domain_deny=["example.com"]), cand(), "domain_deny"),
        (SpendingPolicy(domain_allow=["other.org"]), cand(), "domain_allow"),
    ],
)
def test_each_rule_names_itself(policy: SpendingPolicy, candidate: Candidate, rule: str) -> None:
    with pytest.raises(PolicyRefused) as info:
        check_static_rules(policy, candidate)
    assert info.value.rule == rule


def test_allowed_payment_passes_and_subdomains_match() -> None:
    policy = SpendingPolicy(
        max_per_payment=100,
        domain_allow=["example.com"],
        payee_allow=[PAYEE],
        allowed_assets=[ASSET],
    )
    check_static_rules(policy, cand(100))
    with pytest.raises(PolicyRefused):
        check_static_rules(policy, cand(100, url="https://notexample.com/x"))


def test_floats_are_refused_as_amounts() -> None:
    with pytest.raises(ValidationError):
        SpendingPolicy(max_per_payment=1.5)
    with pytest.raises(ValidationError):
        SpendingPolicy(budget_day="-1")


def test_approval_threshold_is_inclusive() -> None:
    policy = SpendingPolicy(approval_threshold="1000")
    assert needs_approval(policy, 1000)
    assert not needs_approval(policy, 999)
    assert not needs_approval(SpendingPolicy(), 10**30)


def test_policy_amounts_are_decimal_strings_on_the_wire_and_stay_exact() -> None:
    big = 2**200 + 1  # far beyond what a JSON number keeps exact in JavaScript
    policy = SpendingPolicy.model_validate({"budget_day": str(big), "max_per_payment": 5})
    wire = policy.model_dump(mode="json")
    assert wire["budget_day"] == str(big) and wire["max_per_payment"] == "5"
    assert wire["budget_week"] is None
    # what is stored is read back to the same integers (and older rows stored numbers)
    assert SpendingPolicy.model_validate(wire) == policy
    assert SpendingPolicy.model_validate({"budget_day": 7}).budget_day == 7
