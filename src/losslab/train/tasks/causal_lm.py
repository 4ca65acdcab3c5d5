"""``causal_lm``: instruction and chat SFT with masks from ``losslab.masking``.

Loss: the composite of ``loss.terms`` on next-token predictions; token cross-entropy runs
through the fused head (no N x V logits) unless ``loss.fused: false`` or a term needs the
logits themselves (e.g. ``consistency``) or the model's logits are not its LM head applied to
the last hidden state (soft-capped or scaled logits), which the run prints.
Evaluation per split: exact token loss and perplexity over the trained tokens, and with
``eval.generate``: BLEU, chrF and distinct-1/2 of greedy replies to held-out prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from losslab.data.builtin import resolve_data_path
from losslab.data.records import iter_raw_records
from losslab.errors import UserError
from losslab.eval.generation import generation_report
from losslab.eval.language_model import PerplexityAccumulator
from losslab.eval.report import namespace
from losslab.files import write_atomic
from losslab.masking import BuildStats, ChatTemplate, MaskConfig, PackedCollator, PaddedCollator, build_samples
from losslab.masking.parallel import build_samples_parallel
from losslab.masking.render import alpaca_prompt, instruction_messages
from losslab.models import load_causal_lm, load_tokenizer
from losslab.train.config import DataConfig, TrainConfig
from losslab.train.lora import prepare_policy
from losslab.train.next_token import FUSED_FIELDS, LOGIT_FIELDS, NextTokenForward, checked_head
from losslab.train.task import LossNeeds, LossPlan, TaskRun

LOSS_NEEDS = LossNeeds("causal_lm", ({"name": "token_cross_entropy", "weight": 1.0},), LOGIT_FIELDS | {"hidden_states"})


@dataclass
class GenerationPrompt:
    """A held-out prompt (token ids ending with the assistant header) and its reference reply."""

    input_ids: list[int]
    reference: str
    cluster: str | int | None = None  # the record's `cluster`: prompts from one source (losslab compare)


def mask_config(data: DataConfig) -> MaskConfig:
    return MaskConfig(
        mask=data.mask,
        strategy=data.strategy,
        mask_prompt=data.mask_prompt,
        role_weights=dict(data.role_weights or {}),
        prompt_style=data.prompt_style,
        template=data.template,
        max_length=data.max_length,
        truncation=data.truncation,
        on_error=data.on_error,
        kind=data.format,
    )


def loss_needs(config: TrainConfig) -> LossNeeds:
    return LOSS_NEEDS


def metric_names(config: TrainConfig) -> set[str]:
    """The names ``split/metric`` that :func:`evaluate` gives for each split of ``eval.splits``
    (checked against a real evaluation by tests/train/test_metric_names.py)."""
    names = ["loss", "perplexity", "n_tokens"]
    if config.eval.generate:
        names += ["bleu", "chrf", "distinct_1", "distinct_2"]
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


@dataclass
class Splits:
    """The masked samples of each split (``input_ids``, ``labels``, optional ``weights``), the
    held-out generation prompts per evaluation split (with ``eval.generate``) and the run summary."""

    samples: dict[str, list[dict]]
    prompts: dict[str, list[GenerationPrompt]]
    summary: dict[str, Any]


def build_splits(config: TrainConfig, tokenizer: Any, *, task: str = "causal_lm") -> Splits:
    """Read and mask every split of ``config.data`` (``data.mask``, ``eval.mask`` for evaluation)."""
    data = config.data
    masks = mask_config(data)
    eval_masks = replace(masks, mask=config.eval.mask) if config.eval.mask is not None else masks
    splits: dict[str, list[dict]] = {}
    prompts: dict[str, list[GenerationPrompt]] = {}
    summary: dict[str, Any] = {"task": task, "skipped": {}, "dropped": {}}
    for split in ("train", "validation", "test"):
        spec = getattr(data, split)
        if spec is None:
            continue
        path = resolve_data_path(spec, split)
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        stats = BuildStats()
        split_masks = masks if split == "train" else eval_masks
        if data.num_proc > 1:
            built = build_samples_parallel(
                path, tokenizer, split_masks, num_proc=data.num_proc, stats=stats, limit=limit
            )
        else:
            built = build_samples(path, tokenizer, split_masks, stats=stats, limit=limit)
        splits[split] = [_drop_source(s) for s in built]
        summary[split] = stats.summary()
        summary["skipped"][split] = stats.skipped.to_dict()
        summary["dropped"][split] = stats.dropped_log.to_dict()
        print(f"{split}: {stats.summary()}")
        if split != "train" and config.eval.generate:
            prompts[split] = generation_prompts(path, tokenizer, data, config.eval.generation_samples)
    if not splits.get("train"):
        raise UserError(f"no training sample left from {data.train}: {summary.get('train')}")
    return Splits(splits, prompts, summary)


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    data = config.data
    built = build_splits(config, tokenizer)
    splits, prompts, summary = built.samples, built.prompts, built.summary
    model = load_causal_lm(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    model = prepare_policy(model, config)  # LoRA adapters when config.lora is set
    collator = PackedCollator() if data.packing else PaddedCollator(tokenizer.pad_token_id)
    eval_collator = PaddedCollator(tokenizer.pad_token_id)

    fused = config.loss.fused and not plan.missing(FUSED_FIELDS)
    if config.loss.fused and not fused:
        print("fused loss head off: " + "; ".join(plan.missing(FUSED_FIELDS)))
    elif fused and not checked_head(model):
        fused = False
        print(
            "fused loss head off: this model's logits are not its LM head applied to the last hidden state "
            "(logit soft-capping or scaling); the loss is computed on the logits"
        )
    forward = NextTokenForward(
        lm_head=model.get_output_embeddings() if fused else None,
        fused=fused,
        hidden_states=fused or bool(plan.missing(LOGIT_FIELDS)),
    )

    def evaluate(model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        metrics = token_metrics(
            model, dataset, eval_collator, config.training.eval_batch_size or config.training.batch_size
        )
        metrics.update(split_generation_metrics(config, model, tokenizer, prompts, split))
        return namespace(metrics, split)

    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=splits["train"],
        validation=splits.get("validation"),
        test=splits.get("test"),
        collator=collator,
        forward=forward,
        evaluate=evaluate,
        summary=summary,
        shifts_labels=True,
    )


def _drop_source(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "source"}


def generation_prompts(path: Path, tokenizer: Any, data: DataConfig, limit: int) -> list[GenerationPrompt]:
    """Held-out prompts: a chat up to its last assistant turn, or an instruction's prompt."""
    template: ChatTemplate | None = None
    out: list[GenerationPrompt] = []
    for _, raw in iter_raw_records(path):
        if len(out) >= limit:
            break
        if not isinstance(raw, dict):
            continue
        if "messages" in raw:
            messages = raw["messages"]
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if not last:
                continue
            template = template or ChatTemplate(tokenizer, data.template)
            text = template.render(messages[:last], add_generation_prompt=True)
            reference = messages[last]["content"]
        elif "instruction" in raw:
            if data.prompt_style == "alpaca":
                text = alpaca_prompt(raw["instruction"], raw.get("input", ""))
            else:
                template = template or ChatTemplate(tokenizer, data.template)
                text = template.render(
                    instruction_messages(raw["instruction"], raw.get("input", "")), add_generation_prompt=True
                )
            reference = raw["output"]
        else:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-data.max_length :]
        cluster = raw.get("cluster")
        out.append(GenerationPrompt(ids, reference, cluster if isinstance(cluster, (str, int)) else None))
    return out


@torch.no_grad()
def token_metrics(model: torch.nn.Module, dataset: list[dict], collator: Any, batch_size: int) -> dict[str, float]:
    """Exact loss and perplexity over every trained next-token target of ``dataset``."""
    was_training = model.training
    model.eval()
    acc = PerplexityAccumulator()
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        batch = collator(dataset[start : start + batch_size])
        labels = batch.pop("labels").to(device)
        batch.pop("weights", None)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        acc.update_from_logits(logits[:, :-1].float(), labels[:, 1:])
    model.train(was_training)
    return acc.compute()


@torch.no_grad()
def greedy_replies(
    model: PreTrainedModel, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, *, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, in prompt order.

    Prompts of similar length are generated together, left-padded (the model sees the attention
    mask, so a reply is the one it would get alone, up to float rounding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, i in enumerate(group):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]) :] = 1
        out = model.generate(  # type: ignore[operator]  # (mypy resolves it through nn.Module.__getattr__)
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for row, i in enumerate(group):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return [replies[i] for i in range(len(prompts))]


def split_generation_metrics(
    config: TrainConfig, model: torch.nn.Module, tokenizer: Any, prompts: dict[str, list], split: str
) -> dict[str, float]:
    """:func:`generation_metrics` of ``split``'s held-out prompts (``eval.generation_samples`` of
    them), saved to ``generations_<split>.jsonl``; empty when ``eval.generate`` is off or the split
    has no prompts."""
    if not (config.eval.generate and prompts.get(split)):
        return {}
    return generation_metrics(
        cast(PreTrainedModel, model),
        tokenizer,
        prompts[split][: config.eval.generation_samples],
        config.eval.max_new_tokens,
        save_to=Path(config.output_dir) / f"generations_{split}.jsonl",
    )


def generation_metrics(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[GenerationPrompt],
    max_new_tokens: int,
    *,
    save_to: Path | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy replies to held-out prompts, scored against the reference replies.

    ``save_to``: also write one JSON line per prompt (``prompt``, ``reference``, ``hypothesis``),
    atomically, for paired tests over examples (``losslab compare``)."""
    hypotheses = greedy_replies(model, tokenizer, [p.input_ids for p in prompts], max_new_tokens, batch_size=batch_size)
    if save_to is not None:
        write_atomic(
            save_to,
            "".join(
                json.dumps(
                    {
                        "prompt": tokenizer.decode(p.input_ids),
                        "reference": p.reference,
                        "hypothesis": h,
                        **({"cluster": p.cluster} if p.cluster is not None else {}),
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for p, h in zip(prompts, hypotheses)
            ),
        )
    return generation_report(hypotheses, [p.reference for p in prompts]).to_dict()
