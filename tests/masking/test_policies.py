"""Mask policies as a truth table; policy parsing; role weights."""

from __future__ import annotations

import itertools

import pytest

from losslab.errors import UserError
from losslab.masking.policies import MaskPolicy, check_role_weights, is_trained, message_weight, parse_policy

ROLES = ("system", "user", "assistant", "tool")

# (policy, role, is_last_assistant) -> trained
TRUTH = {
    **{(MaskPolicy.ALL, r, last): True for r in ROLES for last in (False, True)},
    **{
        (p, r, last): False
        for p in (MaskPolicy.ASSISTANT, MaskPolicy.LAST, MaskPolicy.COMPLETION)
        for r in ROLES
        if r != "assistant"
        for last in (False, True)
    },
    (MaskPolicy.ASSISTANT, "assistant", False): True,
    (MaskPolicy.ASSISTANT, "assistant", True): True,
    (MaskPolicy.COMPLETION, "assistant", False): True,
    (MaskPolicy.COMPLETION, "assistant", True): True,
    (MaskPolicy.LAST, "assistant", False): False,
    (MaskPolicy.LAST, "assistant", True): True,
}


def test_truth_table_is_complete_and_holds() -> None:
    assert set(TRUTH) == set(itertools.product(MaskPolicy, ROLES, (False, True)))
    for (policy, role, last), expected in TRUTH.items():
        assert is_trained(policy, role, is_last_assistant=last) is expected, (policy, role, last)


def test_defaults_and_mask_prompt() -> None:
    assert parse_policy(None, "chat") is MaskPolicy.ASSISTANT
    assert parse_policy(None, "instruction") is MaskPolicy.COMPLETION
    assert parse_policy("last", "chat") is MaskPolicy.LAST
    for value in (None, "assistant", "last", "completion"):
        assert parse_policy(value, "instruction", mask_prompt=False) is MaskPolicy.ALL
    with pytest.raises(UserError, match="unknown mask policy 'assistants'"):
        parse_policy("assistants", "chat")


def test_role_weights() -> None:
    weights = check_role_weights({"user": 0.5, "assistant": 2})
    assert message_weight("assistant", 0.25, weights) == 0.5
    assert message_weight("user", None, weights) == 0.5
    assert message_weight("tool", None, weights) == 1.0
    with pytest.raises(UserError, match="unknown role 'bot'"):
        check_role_weights({"bot": 1.0})
    with pytest.raises(UserError, match=">= 0"):
        check_role_weights({"user": -1})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_role_weights_must_be_finite(bad: float) -> None:
    """NaN would drop every sample as "weight 0" and infinity would give an infinite loss."""
    with pytest.raises(UserError, match=f"the weight of 'assistant' must be a finite number >= 0; got {bad}"):
        check_role_weights({"assistant": bad})
