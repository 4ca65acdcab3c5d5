"""The finding kinds of a records audit: stable ids, their level and a one-line meaning.

docs/audit.md documents each (a test keeps the two in sync); a kind is never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass

from losslab.audit.findings import Level


@dataclass(frozen=True)
class Kind:
    level: Level
    summary: str


LABEL_KINDS: dict[str, Kind] = {
    "labels_empty": Kind("error", "no record has a trained token: the labels train nothing"),
    "labels_zero_targets": Kind("error", "a record whose labels train no token"),
    "labels_shifted": Kind("error", "the labels are losslab's mask shifted by one token"),
    "label_values": Kind("error", "trained labels that are not the token at their position"),
    "header_trained": Kind("error", "template text (role header, separator, default system prompt) trained"),
    "system_trained": Kind("error", "system message text trained"),
    "user_trained": Kind("error", "user message text trained"),
    "tool_trained": Kind("error", "tool output trained"),
    "empty_think_trained": Kind("warning", "an empty reasoning block <think></think> trained"),
    "other_turn_trained": Kind("warning", "an assistant turn outside the mask policy trained (e.g. under last)"),
    "whitespace_trained": Kind(
        "info", "whitespace-only template text trained (the newline after a role header or an end-of-turn)"
    ),
    "assistant_untrained": Kind("error", "assistant content left untrained"),
    "end_of_turn_untrained": Kind("error", "the end-of-turn token not trained: the model never learns to stop"),
    "prompt_untrained": Kind("warning", "tokens policy all trains that the labels leave untrained"),
    "tokens_differ": Kind("warning", "the labels' input_ids differ from the template's own rendering"),
    "labels_truncated": Kind("info", "the labels' input_ids are the rendering cut short (truncated)"),
}

DATASET_KINDS: dict[str, Kind] = {
    "zero_targets": Kind("error", "a record with no trained token under the policy"),
    "truncated_to_zero": Kind("error", "a record left with no trained token after --max-length"),
    "special_token_text": Kind("warning", "a special token's text typed inside a message"),
    "boundary_shift": Kind("warning", "prompt and answer tokenised apart give other tokens than together"),
    "not_prefix_stable": Kind("warning", "the template renders a conversation prefix differently from the whole"),
    "unrendered_message": Kind("warning", "a message the chat template leaves out"),
}

KINDS: dict[str, Kind] = {**LABEL_KINDS, **DATASET_KINDS}
