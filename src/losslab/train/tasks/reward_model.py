"""``reward_model``: a scalar score of prompt + answer, trained on preference pairs
``{"prompt": str | messages, "chosen": str, "rejected": str, "margin": float (optional)}``.

The model is a sequence-classification head with one output
(``AutoModelForSequenceClassification``, ``num_labels=1``). What it reads:

- a tokenizer with a chat template (the decoders): the conversation ``prompt`` (a user
  message, or the given messages) + the answer as the assistant turn, rendered by the
  template; the score is read at the last token. A too-long pair loses the start of its
  prompt first, then the end of its answer.
- otherwise (encoders): the text pair ``(prompt, answer)`` (``[CLS] prompt [SEP] answer
  [SEP]`` for BERT, the score read from ``[CLS]``), truncated longest-first.

Chosen and rejected answers of a batch go through ONE forward (2B rows: chosen first).
Loss inputs: ``rewards_chosen``, ``rewards_rejected`` (N,) and, with ``data.use_margin`` and
records that have one, ``margins`` (N,) (0 for a record without): ``bradley_terry``
(default: ``-log sigmoid(r_c - r_r - m)``) or ``margin_ranking``; ``l2`` / ``l2_sp``.

Evaluation per split: ``pairwise_accuracy`` (ties count half), ``reward_margin`` (mean
``r_c - r_r``), ``reward_chosen``, ``reward_rejected`` and ``loss`` = mean
``-log sigmoid(r_c - r_r)`` (Bradley-Terry without margin, whatever loss trained the model);
both rewards of every pair go to ``predictions_<split>.jsonl``.
"""

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
from losslab.train.tasks._predictions import save_predictions
from losslab.losses.composite import LossInputs
from losslab.models import load_model, load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.tasks import TaskRun
from losslab.train.tasks._common import (
    collate_texts,
    encode,
    encode_splits,
    eval_batch_size,
    eval_batches,
    model_inputs,
    model_kwargs,
    per_record,
    plan_loss,
    read_splits,
    skipped_records,
    set_pad_token,
    task_run,
)

DEFAULT_TERMS = [{"name": "bradley_terry"}]
PROVIDES = {"rewards_chosen", "rewards_rejected", "margins", "num_examples"}


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
    answer_ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    room = max(0, max_length - len(answer_ids))  # the prompt loses its start first
    ids = (head_ids[len(head_ids) - room:] if room else []) + answer_ids
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


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[LossInputs, dict[str, torch.Tensor]]:
    rewards = model(**model_inputs(batch)).logits.squeeze(-1)  # (2B,)
    n = batch["labels"].shape[0]
    chosen, rejected = rewards[:n], rewards[n:]
    return (LossInputs(rewards_chosen=chosen, rewards_rejected=rejected, margins=batch.get("margins")),
            {"rewards_chosen": chosen, "rewards_rejected": rejected})


def scores(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """The metrics of a split from its (N,) rewards."""
    loss = -F.logsigmoid(chosen.double() - rejected.double()).mean()
    return {**reward_metrics(chosen.double(), rejected.double()), "loss": float(loss)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: list[dict], split: str, *, collator: PairCollator,
             batch_size: int, output_dir: str | None = None) -> dict[str, float]:
    """The metrics of ``split`` (see the module docstring), named ``split/metric``; writes
    the rewards into ``output_dir`` (when given)."""
    chosen, rejected = [], []
    for batch in eval_batches(model, dataset, collator, batch_size):
        out = forward(model, batch)[1]
        chosen.append(out["rewards_chosen"].float().cpu())
        rejected.append(out["rewards_rejected"].float().cpu())
    chosen_all, rejected_all = torch.cat(chosen), torch.cat(rejected)
    save_predictions(output_dir, split, [
        {"prompt": f.get("prompt_text"), "chosen": f.get("chosen_text"), "rejected": f.get("rejected_text"),
         "reward_chosen": c, "reward_rejected": r}
        for f, c, r in zip(dataset, chosen_all.tolist(), rejected_all.tolist())])
    return namespace(scores(chosen_all, rejected_all), split)


def metric_names(config: TrainConfig) -> set[str]:
    """The names ``split/metric`` that :func:`evaluate` gives for each split of ``eval.splits``
    (checked against a real evaluation by tests/train/test_metric_names.py)."""
    names = ["pairwise_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "loss"]
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


def check_loss(config: TrainConfig) -> None:
    """A term this task cannot feed is a ``UserError`` (see :func:`plan_loss`)."""
    plan_loss(config, "reward_model", DEFAULT_TERMS, PROVIDES)


def build(config: TrainConfig) -> TaskRun:
    from transformers import AutoModelForSequenceClassification

    plan = plan_loss(config, "reward_model", DEFAULT_TERMS, PROVIDES)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    splits = read_splits(config, SCHEMAS["preference"])

    def encode_record(source: Any, record: Any) -> tuple[dict, bool]:
        chosen, cut_c = encode_answer(tokenizer, record.prompt, record.chosen, config.data.max_length)
        rejected, cut_r = encode_answer(tokenizer, record.prompt, record.rejected, config.data.max_length)
        feature: dict[str, Any] = {"chosen": chosen, "rejected": rejected, "chosen_text": record.chosen,
                                   "rejected_text": record.rejected,
                                   "prompt_text": "\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages(record.prompt))
                                   if not isinstance(record.prompt, str) else record.prompt}
        if config.data.use_margin and record.margin is not None:
            feature["margin"] = record.margin
        return feature, cut_c or cut_r

    datasets, lines = encode_splits(splits, per_record(config, encode_record))
    model = load_model(AutoModelForSequenceClassification, config.model, num_labels=1, **model_kwargs(config))
    set_pad_token(model, tokenizer)
    collator = PairCollator(tokenizer.pad_token_id)

    margins = "record margins" if any("margin" in f for f in datasets["train"]) else "no margins"
    print(f"margins: {margins}")
    return task_run(model=model, tokenizer=tokenizer, datasets=datasets, collator=collator, plan=plan, forward=forward,
                    evaluate=partial(evaluate, collator=collator, batch_size=eval_batch_size(config), output_dir=config.output_dir),
                    summary={"task": "reward_model", "margins": margins, "data": lines, "skipped": skipped_records(splits),
                             "input": "chat template" if getattr(tokenizer, "chat_template", None) else "text pair"})
