"""The contract record formats (shared/design/contracts.md) as pydantic models.

Strict: unknown fields are rejected, strings are not coerced from numbers, so a typo in a
field name or a wrong type is reported instead of silently trained on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(_Record):
    role: Role
    content: str
    weight: float | None = Field(default=None, ge=0)

    @field_validator("weight", mode="before")
    @classmethod
    def _int_weight(cls, v: object) -> object:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class ChatRecord(_Record):
    messages: list[Message] = Field(min_length=1)


class InstructionRecord(_Record):
    instruction: str
    input: str = ""
    output: str


class ClassificationRecord(_Record):
    text: str
    label: str | int


class RegressionRecord(_Record):
    """Classification-style text with a real-valued target (e.g. a mean sentiment rating)."""

    text: str
    label: float


class NerRecord(_Record):
    tokens: list[str] = Field(min_length=1)
    tags: list[str] = Field(min_length=1)

    @field_validator("tags")
    @classmethod
    def _same_length(cls, tags: list[str], info: object) -> list[str]:
        tokens = getattr(info, "data", {}).get("tokens")
        if tokens is not None and len(tokens) != len(tags):
            raise ValueError(f"{len(tags)} tags for {len(tokens)} tokens")
        return tags


class PreferenceRecord(_Record):
    prompt: str | list[Message]
    chosen: str
    rejected: str
    margin: float | None = None

    @field_validator("margin", mode="before")
    @classmethod
    def _int_margin(cls, v: object) -> object:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


SCHEMAS: dict[str, type[_Record]] = {
    "chat": ChatRecord,
    "instruction": InstructionRecord,
    "classification": ClassificationRecord,
    "regression": RegressionRecord,
    "ner": NerRecord,
    "preference": PreferenceRecord,
}
