"""Mask policies: which parts of a record are trained, and with what weight.

A record is a list of messages (an instruction record is a user turn, its prompt, and an
assistant turn, its response). A policy decides, per message, whether its tokens are trained:

=============  ========================================================================
``all``        every token (template text included), minus padding and the first token
``assistant``  every assistant turn: content + the text that closes the turn
``last``       only the final assistant turn
``completion`` the response(s): the same as ``assistant``; the default for
               instruction records, ``assistant`` is the default for chat records
=============  ========================================================================

``mask_prompt=False`` turns any policy into ``all`` (the prompt is trained too).
Weights: a trained token of message ``m`` has weight ``role_weights[m.role] * m.weight``
(both default 1); template text between messages has weight 1 under ``all``. A weight of 0
means "not trained" (label -100), so it can switch single turns off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum

from losslab.data.schemas import ROLES
from losslab.errors import UserError


class MaskPolicy(str, Enum):
    ALL = "all"
    ASSISTANT = "assistant"
    LAST = "last"
    COMPLETION = "completion"


DEFAULT_POLICY = {"chat": MaskPolicy.ASSISTANT, "instruction": MaskPolicy.COMPLETION}


def parse_policy(value: str | MaskPolicy | None, kind: str, *, mask_prompt: bool = True) -> MaskPolicy:
    """The policy to apply to records of ``kind`` ("chat" | "instruction")."""
    if value is None:
        policy = DEFAULT_POLICY[kind]
    else:
        try:
            policy = MaskPolicy(value)
        except ValueError:
            choices = ", ".join(p.value for p in MaskPolicy)
            raise UserError(f"unknown mask policy {value!r}; choose one of: {choices}") from None
    return policy if mask_prompt else MaskPolicy.ALL


def is_trained(policy: MaskPolicy, role: str, *, is_last_assistant: bool) -> bool:
    """The truth table: is a message with this role (and position) trained under ``policy``?"""
    if policy is MaskPolicy.ALL:
        return True
    if role != "assistant":
        return False
    if policy is MaskPolicy.LAST:
        return is_last_assistant
    return True  # ASSISTANT, COMPLETION


def check_role_weights(role_weights: Mapping[str, float] | None) -> dict[str, float]:
    """Validated per-role weights (unknown roles, negative weights, NaN and infinity are errors)."""
    out: dict[str, float] = {}
    for role, weight in (role_weights or {}).items():
        if role not in ROLES:
            raise UserError(f"role_weights: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise UserError(f"role_weights: the weight of {role!r} must be a finite number >= 0; got {weight!r}")
        out[role] = float(weight)
    return out


def message_weight(role: str, weight: float | None, role_weights: Mapping[str, float]) -> float:
    """Weight of a message's trained tokens: role weight x per-message weight."""
    return role_weights.get(role, 1.0) * (1.0 if weight is None else float(weight))
