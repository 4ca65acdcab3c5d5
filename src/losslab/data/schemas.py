"""The contract record formats (shared/design/contracts.md) as pydantic models.

Strict: unknown fields are rejected, strings are not coerced from numbers, so a typo in a
field name or a wrong type is reported instead of silently trained on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def _valid_unicode(text: str) -> str:
    # JSON lets "\ud800" through as a lone surrogate: not text, and tokenizers fail on it later
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode text (a lone surrogate {text[exc.start]!r} at character {exc.start})"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A string that is valid Unicode (no lone surrogates); control characters are kept as data."""


class _Record(BaseModel):
    # non-finite numbers (NaN, inf: from CSV/parquet or Python records) would train on NaN
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    cluster: Annotated[str, Field(min_length=1)] | int | None = None
    """Records that share a source (turns of one conversation, texts of one author) share a
    ``cluster``: ``losslab compare`` then treats them as one unit of its example-level statistics."""


def _int_as_float(v: object) -> object:
    """A JSON integer as a float (a bool stays a bool, to be refused); too large: a ``ValueError``."""
    if not isinstance(v, int) or isinstance(v, bool):
        return v
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"number {str(v)[:20]}... is too large for a float") from None


class Message(_Record):
    role: Role
    content: Text
    weight: float | None = Field(default=None, ge=0)

    @field_validator("weight", mode="before")
    @classmethod
    def _int_weight(cls, v: object) -> object:
        return _int_as_float(v)


class ChatRecord(_Record):
    messages: list[Message] = Field(min_length=1)


class InstructionRecord(_Record):
    instruction: Text
    input: Text = ""
    output: Text


class ClassificationRecord(_Record):
    text: Text
    label: Text | int


class RegressionRecord(_Record):
    """Classification-style text with a real-valued target (e.g. a mean sentiment rating)."""

    text: Text
    label: float


class NerRecord(_Record):
    tokens: list[Text] = Field(min_length=1)
    tags: list[Text] = Field(min_length=1)

    @field_validator("tags")
    @classmethod
    def _same_length(cls, tags: list[str], info: object) -> list[str]:
        tokens = getattr(info, "data", {}).get("tokens")
        if tokens is not None and len(tokens) != len(tags):
            raise ValueError(f"{len(tags)} tags for {len(tokens)} tokens")
        return tags


class PreferenceRecord(_Record):
    prompt: Text | Annotated[list[Message], Field(min_length=1)]
    chosen: Text
    rejected: Text
    margin: float | None = None

    @field_validator("margin", mode="before")
    @classmethod
    def _int_margin(cls, v: object) -> object:
        return _int_as_float(v)

    @field_validator("rejected")
    @classmethod
    def _different(cls, rejected: str, info: object) -> str:
        if getattr(info, "data", {}).get("chosen") == rejected:  # no preference: nothing to learn but noise
            raise ValueError("the same text as 'chosen' (a pair needs two different answers)")
        return rejected


class UnpairedPreferenceRecord(_Record):
    """One completion of a prompt, labelled desirable or not (KTO's data)."""

    prompt: Text | Annotated[list[Message], Field(min_length=1)]
    completion: Text
    desirable: bool


SCHEMAS: dict[str, type[_Record]] = {
    "chat": ChatRecord,
    "instruction": InstructionRecord,
    "classification": ClassificationRecord,
    "regression": RegressionRecord,
    "ner": NerRecord,
    "preference": PreferenceRecord,
    "unpaired_preference": UnpairedPreferenceRecord,
}
