"""``distill``: a student causal LM trained towards a frozen teacher's next-token distributions,
on chat or instruction records with losslab's masks (the data path of ``causal_lm``).

- ``distill.teacher``: any causal LM losslab loads, sharing the student's tokenizer (checked
  before anything is loaded; no vocabulary mapping). ``model``: the student, or
  ``distill.student: {init_from: teacher, keep_layers: even}`` builds it from the teacher's
  layers (DistilBERT's initialisation), in memory; the run saves it with its model.
- What the teacher gives the loss: with ``distill.top_k`` its top-k logits per trained position
  (``teacher_topk``), computed one sample at a time, live or from the offline cache
  (``distill.cache: true``, :mod:`losslab.train.teacher_cache`; bit-equal either way); without,
  its full distribution: its hidden states and head for the fused heads (no N x V tensor), else
  its logits. A loss without teacher terms (plain SFT) never runs the teacher while training.
- ``distill.lmbda``: GKD's on-policy share of training batches (:class:`OnPolicy`).
- ``lora``: adapters on the student (:func:`~losslab.train.lora.prepare_policy`, as in
  ``causal_lm``); the teacher is never wrapped.

Evaluation per split: the student's token loss and perplexity over the trained tokens, its
top-1 agreement with the teacher there (``teacher_agreement``), and with ``eval.generate``
BLEU, chrF and distinct-1/2 of greedy replies.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from losslab.errors import UserError
from losslab.eval.language_model import PerplexityAccumulator
from losslab.eval.report import namespace
from losslab.masking import PackedCollator, PaddedCollator
from losslab.models import load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.lora import AdaptersDisabled, prepare_policy
from losslab.train.next_token import FUSED_FIELDS, LOGIT_FIELDS, NextTokenForward, checked_head
from losslab.train.task import LossNeeds, LossPlan, TaskRun
from losslab.train.tasks.causal_lm import build_splits, split_generation_metrics
from losslab.train.tasks.distill_batches import (
    TOPK_FEATURE,
    DistillCollator,
    DistillForward,
    OnPolicy,
    TeacherSide,
    span_positions,
)
from losslab.train.tasks.distill_models import check_vocabularies, load_models, load_teacher, student_name
from losslab.train.teacher_cache import cached_teacher_topk, item_topk, teacher_fingerprint, trained_positions

TEACHER_FUSED = frozenset({"teacher_hidden_states", "teacher_lm_head_weight"})
TEACHER_FIELDS = TEACHER_FUSED | {"teacher_logits", "teacher_topk"}
STUDENT_FIELDS = LOGIT_FIELDS | FUSED_FIELDS


def loss_needs(config: TrainConfig) -> LossNeeds:
    """The teacher's top-k with ``distill.top_k``, else its logits or its fused-head inputs;
    checks first that teacher and student share a vocabulary (reads their tokenizers only)."""
    if config.distill.teacher is None:
        raise UserError("task distill needs distill.teacher (the model to distil from)", where="distill.teacher")
    check_vocabularies(config)
    teacher = frozenset({"teacher_topk"}) if config.distill.top_k is not None else TEACHER_FUSED | {"teacher_logits"}
    return LossNeeds("distill", ({"name": "distillation", "weight": 1.0},), STUDENT_FIELDS | teacher)


def metric_names(config: TrainConfig) -> set[str]:
    names = ["loss", "perplexity", "n_tokens", "teacher_agreement"]
    if config.eval.generate:
        names += ["bleu", "chrf", "distinct_1", "distinct_2"]
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


def teacher_modes(config: TrainConfig, plan: LossPlan) -> tuple[str, bool]:
    """``(teacher mode, student fused)``: what the loss reads from the teacher (topk, fused,
    logits, or none when no term needs it) and whether the student's head is fused."""
    fused_ok = config.loss.fused
    if not plan.missing(STUDENT_FIELDS):
        return "none", fused_ok and not plan.missing(FUSED_FIELDS)
    if config.distill.top_k is not None:
        return "topk", fused_ok and not plan.missing(FUSED_FIELDS | {"teacher_topk"})
    if fused_ok and not plan.missing(FUSED_FIELDS | TEACHER_FUSED):
        return "fused", True
    return "logits", False


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    d = config.distill
    assert d.teacher is not None
    tokenizer = load_tokenizer(student_name(config), trust_remote_code=config.trust_remote_code)
    built = build_splits(config, tokenizer, task="distill")
    splits, prompts, summary = built.samples, built.prompts, built.summary
    mode, fused = teacher_modes(config, plan)
    live = not d.cache  # the teacher scores batches during training (and evaluation)
    own_base = live and config.teacher_is_own_base
    student, teacher = load_models(config, keep_teacher=live and not own_base)
    student = prepare_policy(student, config)  # LoRA adapters when config.lora is set (the teacher stays as it is)
    if own_base:  # the teacher is the student's frozen base: its adapters switched off, no second copy
        teacher = AdaptersDisabled(student)
        print("teacher: the student's own base model (its LoRA adapters switched off), no second copy")
    vocab = student.get_output_embeddings().weight.shape[0]
    if d.top_k is not None and d.top_k > vocab:
        raise UserError(f"top_k {d.top_k} exceeds the vocabulary ({vocab} tokens)", where="distill.top_k")
    if fused and not checked_head(student):
        fused = False
        if mode == "fused":  # the teacher's side follows: a fused teacher needs a fused student
            mode = "logits"
        print("fused loss head off: the student's logits are not its LM head applied to its last hidden state")
    if mode == "fused" and teacher is not None and not own_base and not checked_head(teacher):
        mode, fused = "logits", False
        print("fused heads off: the teacher's logits are not its LM head applied to its last hidden state")
    top1: dict[str, list[torch.Tensor]] = {}
    if d.cache:
        assert d.top_k is not None
        for split, features in splits.items():
            per_item = cache_topk(config, features, d.top_k)
            for feature, topk in zip(features, per_item):
                feature[TOPK_FEATURE] = topk
            if split != "train":
                top1[split] = [t.indices[:, 0] for t in per_item]
        summary["teacher"] = f"cache (top {d.top_k})"
    else:
        summary["teacher"] = f"live ({mode}{f', top {d.top_k}' if d.top_k else ''})"
    summary["teacher_model"] = d.teacher
    if own_base:
        summary["teacher_model"] = f"{d.teacher} (the student's base, adapters off)"
    print(f"teacher {d.teacher}: {summary['teacher']}")

    base = PackedCollator() if config.data.packing else PaddedCollator(tokenizer.pad_token_id)
    collator = DistillCollator(base, packed=config.data.packing, top_k=d.top_k if d.cache else None)
    eval_collator = DistillCollator(
        PaddedCollator(tokenizer.pad_token_id), packed=False, top_k=d.top_k if d.cache else None
    )
    side = TeacherSide(mode, teacher if mode != "none" else None, d.top_k)
    policy = OnPolicy(d.lmbda, config.seed, tokenizer.pad_token_id, d.generation_temperature) if d.lmbda > 0 else None
    forward = DistillForward(
        NextTokenForward(
            lm_head=student.get_output_embeddings() if fused else None,
            fused=fused,
            hidden_states=fused or bool(plan.missing(LOGIT_FIELDS | TEACHER_FIELDS)),
        ),
        side,
        policy,
    )
    batch_size = config.training.eval_batch_size or config.training.batch_size

    def teacher_top1(split: str, dataset: list[dict]) -> list[torch.Tensor]:
        if split not in top1:
            assert teacher is not None
            top1[split] = [
                item_topk(teacher, f["input_ids"], trained_positions(f["labels"]), 1).indices[:, 0].cpu()
                for f in dataset
            ]
        return top1[split]

    def evaluate(model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        metrics = student_metrics(model, dataset, eval_collator, batch_size, teacher_top1(split, dataset))
        metrics.update(split_generation_metrics(config, model, tokenizer, prompts, split))
        return namespace(metrics, split)

    return TaskRun(
        model=student,
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


def cache_topk(config: TrainConfig, features: list[dict], top_k: int) -> list[Any]:
    """Every feature's teacher top-k from the cache, the teacher loaded only when some are missing
    (and dropped afterwards)."""
    d = config.distill
    assert d.teacher is not None
    data = config.data
    fingerprint = teacher_fingerprint(
        d.teacher,
        features,
        top_k=top_k,
        extra={
            "dtype": config.dtype,
            "template": Path(data.template).read_text(encoding="utf-8") if data.template else None,
            "mask": data.mask,
            "eval_mask": config.eval.mask,
            "strategy": data.strategy,
            "max_length": data.max_length,
        },
    )
    loaded: dict[str, torch.nn.Module] = {}

    def compute(item: Any) -> Any:
        if "teacher" not in loaded:
            loaded["teacher"] = load_teacher(config)
        return item_topk(loaded["teacher"], item["input_ids"], trained_positions(item["labels"]), top_k)

    values = cached_teacher_topk(features, compute, fingerprint=fingerprint, top_k=top_k)
    print(f"teacher top-{top_k}: {len(features)} samples, cache entry {fingerprint}")
    if loaded:
        loaded.clear()
        gc.collect()
    return values


@torch.no_grad()
def student_metrics(
    model: torch.nn.Module, dataset: list[dict], collator: DistillCollator, batch_size: int, top1: list[torch.Tensor]
) -> dict[str, float]:
    """Exact token loss and perplexity over every trained target, and the share of them where
    the student's most likely token is the teacher's (``teacher_agreement``)."""
    was_training = model.training
    model.eval()
    acc = PerplexityAccumulator()
    agree = total = 0
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        features = dataset[start : start + batch_size]
        batch = collator(features)
        labels = batch["labels"]
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        acc.update_from_logits(logits[:, :-1].float(), labels[:, 1:].to(device))
        best = logits.argmax(-1).cpu()  # (B, T)
        for (row, begin, n), teacher in zip(batch["item_spans"].tolist(), top1[start : start + batch_size]):
            positions = begin + span_positions(labels, row, begin, n)
            agree += int((best[row, positions] == teacher.cpu()).sum())
            total += len(positions)
    model.train(was_training)
    return {**acc.compute(), "teacher_agreement": agree / total if total else float("nan")}
