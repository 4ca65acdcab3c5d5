"""``reward_model``: a scalar score of prompt + answer trained on preference pairs (chosen and
rejected in one forward). docs/training.md#reward_model describes what the model reads, the
loss inputs and the metrics."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from losslab.data.schemas import SCHEMAS
from losslab.errors import UserError
from losslab.eval.ranking import reward_metrics
from losslab.eval.report import namespace
from losslab.losses.composite import LossInputs
from losslab.models import load_model, load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.task import LossNeeds, LossPlan, TaskRun
from losslab.train.tasks.backbone import model_kwargs, set_pad_token
from losslab.train.tasks.batches import collate_texts, encode, eval_batch_size, eval_batches, model_inputs
from losslab.train.tasks.predictions import save_predictions
from losslab.train.tasks.records import encode_splits, per_record, read_splits, skipped_records

LOSS_NEEDS = LossNeeds(
    "reward_model",
    ({"name": "bradley_terry"},),
    frozenset({"rewards_chosen", "rewards_rejected", "margins", "num_examples"}),
)


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """The prompt as chat messages: a string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m.role, "content": m.content} for m in prompt]


def encode_answer(tokenizer: Any, prompt: Any, answer: str, max_length: int) -> tuple[dict[str, list[int]], bool]:
    """The tokens the reward model scores for one (prompt, answer); see the module docstring."""
    messages = prompt_messages(prompt)
    if not getattr(tokenizer, "chat_template", None):
        context = "\n".join(m["content"] for m in messages)
        return encode(tokenizer, context, answer, max_length=max_length)
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(head):
        raise UserError("the chat template does not render the prompt as a prefix of prompt + answer")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    room = max(0, max_length - len(answer_ids))  # the prompt loses its start first
    ids = (head_ids[len(head_ids) - room :] if room else []) + answer_ids
    return {"input_ids": ids[:max_length]}, len(head_ids) + len(answer_ids) > max_length


@dataclass
class PairCollator:
    """One batch of 2B texts (chosen rows first, then rejected), ``labels`` (B,) zeros (one
    trained item per pair, for the Trainer's count) and ``margins`` (B,) when present."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_texts([f["chosen"] for f in features] + [f["rejected"] for f in features], self.pad_id)
        batch["labels"] = torch.zeros(len(features), dtype=torch.long)
        if any("margin" in f for f in features):
            batch["margins"] = torch.tensor([f.get("margin", 0.0) for f in features], dtype=torch.float32)
        return batch


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
    rewards = model(**model_inputs(batch)).logits.squeeze(-1)  # (2B,)
    n = batch["labels"].shape[0]
    return LossInputs(rewards_chosen=rewards[:n], rewards_rejected=rewards[n:], margins=batch.get("margins"))


def scores(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """The metrics of a split from its (N,) rewards."""
    loss = -F.logsigmoid(chosen.double() - rejected.double()).mean()
    return {**reward_metrics(chosen.double(), rejected.double()), "loss": float(loss)}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: list[dict],
    split: str,
    *,
    collator: PairCollator,
    batch_size: int,
    output_dir: str | None = None,
) -> dict[str, float]:
    """The metrics of ``split`` (see the module docstring), named ``split/metric``; writes
    the rewards into ``output_dir`` (when given)."""
    chosen, rejected = [], []
    for batch in eval_batches(model, dataset, collator, batch_size):
        out = forward(model, batch)
        chosen.append(out.rewards_chosen.float().cpu())  # type: ignore[union-attr]
        rejected.append(out.rewards_rejected.float().cpu())  # type: ignore[union-attr]
    chosen_all, rejected_all = torch.cat(chosen), torch.cat(rejected)
    save_predictions(
        output_dir,
        split,
        [
            {
                "prompt": f.get("prompt_text"),
                "chosen": f.get("chosen_text"),
                "rejected": f.get("rejected_text"),
                "reward_chosen": c,
                "reward_rejected": r,
            }
            for f, c, r in zip(dataset, chosen_all.tolist(), rejected_all.tolist())
        ],
    )
    return namespace(scores(chosen_all, rejected_all), split)


def loss_needs(config: TrainConfig) -> LossNeeds:
    return LOSS_NEEDS


def metric_names(config: TrainConfig) -> set[str]:
    """The names ``split/metric`` that :func:`evaluate` gives for each split of ``eval.splits``
    (checked against a real evaluation by tests/train/test_metric_names.py)."""
    names = ["pairwise_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "loss"]
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    splits = read_splits(config, SCHEMAS["preference"])

    def encode_record(source: Any, record: Any) -> tuple[dict, bool]:
        chosen, cut_c = encode_answer(tokenizer, record.prompt, record.chosen, config.data.max_length)
        rejected, cut_r = encode_answer(tokenizer, record.prompt, record.rejected, config.data.max_length)
        feature: dict[str, Any] = {
            "chosen": chosen,
            "rejected": rejected,
            "chosen_text": record.chosen,
            "rejected_text": record.rejected,
            "prompt_text": "\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages(record.prompt))
            if not isinstance(record.prompt, str)
            else record.prompt,
        }
        if config.data.use_margin and record.margin is not None:
            feature["margin"] = record.margin
        return feature, cut_c or cut_r

    datasets, lines = encode_splits(splits, per_record(config, encode_record))
    model = load_model(AutoModelForSequenceClassification, config.model, num_labels=1, **model_kwargs(config))
    set_pad_token(model, tokenizer)
    collator = PairCollator(tokenizer.pad_token_id)

    margins = "record margins" if any("margin" in f for f in datasets["train"]) else "no margins"
    print(f"margins: {margins}")
    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=datasets["train"],
        validation=datasets.get("validation"),
        test=datasets.get("test"),
        collator=collator,
        forward=forward,
        evaluate=partial(evaluate, collator=collator, batch_size=eval_batch_size(config), output_dir=config.output_dir),
        summary={
            "task": "reward_model",
            "margins": margins,
            "data": lines,
            "skipped": skipped_records(splits),
            "input": "chat template" if getattr(tokenizer, "chat_template", None) else "text pair",
        },
    )
