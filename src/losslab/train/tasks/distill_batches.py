"""The ``distill`` task's batches and forward: where each sample lies in a batch, the teacher's
top-k scattered onto the batch's positions (cached or live, the same values), the teacher's
full distribution (its logits, or its hidden states and head for the fused heads), and GKD's
on-policy completions (``distill.lmbda``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from losslab.labels import IGNORE_INDEX
from losslab.losses.common import TeacherTopK
from losslab.losses.composite import LossInputs
from losslab.train.next_token import NextTokenForward
from losslab.train.teacher_cache import item_topk

SPANS = "item_spans"
TOPK_LOGITS, TOPK_INDICES = "teacher_topk_logits", "teacher_topk_indices"
TOPK_FEATURE = "teacher_topk"
"""A feature's cached :class:`TeacherTopK` (R, k), one row per trained position."""


def item_spans(samples: Sequence[Mapping[str, Any]], packed: bool) -> torch.Tensor:
    """(n, 3) int64: each sample's ``row, start, length`` in the collated batch (right padding,
    or one packed row of the samples in order, empty ones left out)."""
    spans, offset = [], 0
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        if packed:
            if n:
                spans.append((0, offset, n))
            offset += n
        else:
            spans.append((b, 0, n))
    return torch.tensor(spans, dtype=torch.long).reshape(-1, 3)


def span_positions(labels: torch.Tensor, row: int, start: int, length: int) -> torch.Tensor:
    """The trained positions ``t`` of one sample (``labels[start + t + 1] != -100``), (R,) int64."""
    return (labels[row, start + 1 : start + length] != IGNORE_INDEX).nonzero().flatten()


def scatter_topk(
    per_item: Sequence[TeacherTopK], spans: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-k (R_i, k) onto the batch's positions: logits (B, T, k) float32 and ids
    (B, T, k) int64, zero where nothing is trained (position t predicts token t + 1)."""
    shape = (*labels.shape, k)
    logits = torch.zeros(shape, dtype=torch.float32, device=labels.device)
    indices = torch.zeros(shape, dtype=torch.long, device=labels.device)
    for item, (row, start, length) in zip(per_item, spans.tolist()):
        cols = start + span_positions(labels, row, start, length)
        if len(cols) != item.logits.shape[0]:
            raise ValueError(f"a sample has {len(cols)} trained positions but {item.logits.shape[0]} top-k rows")
        logits[row, cols] = item.logits.to(labels.device)
        indices[row, cols] = item.indices.to(device=labels.device, dtype=torch.long)
    return logits, indices


@dataclass
class DistillCollator:
    """The causal-LM collator, plus ``item_spans`` and, for features carrying the cached top-k,
    ``teacher_topk_logits``/``teacher_topk_indices`` (B, T, k)."""

    base: Callable[[list[dict]], dict[str, Any]]
    packed: bool
    top_k: int | None = None

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        batch = self.base(samples)
        spans = item_spans(samples, self.packed)
        batch[SPANS] = spans
        if self.top_k is not None and samples and all(TOPK_FEATURE in s for s in samples):
            per_item = [s[TOPK_FEATURE] for s in samples if not self.packed or len(s["input_ids"])]
            batch[TOPK_LOGITS], batch[TOPK_INDICES] = scatter_topk(per_item, spans, batch["labels"], self.top_k)
        return batch


@dataclass
class TeacherSide:
    """What the teacher gives the loss: ``mode`` topk (its top-``k`` per sample, :func:`item_topk`),
    fused (its last hidden states and head weight) or logits (its (B, T, V) logits); ``model``
    None when the batches carry the cached top-k (or no term reads the teacher: ``mode`` none)."""

    mode: str  # topk | fused | logits | none
    model: torch.nn.Module | None = None
    k: int | None = None

    def to(self, device: torch.device) -> None:
        if self.model is not None and next(self.model.parameters()).device != device:
            self.model.to(device)

    def fill(self, inputs: LossInputs, batch: Mapping[str, Any], model_inputs: Mapping[str, Any]) -> None:
        """Sets the teacher fields of ``inputs`` (shifted like the student's) for one batch."""
        if self.mode == "none":
            return
        labels = batch["labels"]
        if self.mode == "topk":
            assert self.k is not None
            if TOPK_LOGITS in batch:
                logits, indices = batch[TOPK_LOGITS], batch[TOPK_INDICES]
            else:
                assert self.model is not None, "no cached top-k in the batch and no live teacher"
                self.to(labels.device)
                ids = batch["input_ids"]
                per_item = [
                    item_topk(self.model, ids[row, start : start + n], span_positions(labels, row, start, n), self.k)
                    for row, start, n in batch[SPANS].tolist()
                ]
                logits, indices = scatter_topk(per_item, batch[SPANS], labels, self.k)
            inputs.teacher_topk = TeacherTopK(logits[:, :-1], indices[:, :-1])
            return
        assert self.model is not None
        self.to(labels.device)
        with torch.no_grad():
            if self.mode == "fused":
                keep = torch.zeros(0, dtype=torch.long, device=labels.device)
                out = self.model(**model_inputs, output_hidden_states=True, logits_to_keep=keep)
                inputs.teacher_hidden_states = out.hidden_states[-1][:, :-1]
                head = self.model.get_output_embeddings()  # type: ignore[operator]
                assert head is not None
                inputs.teacher_lm_head_weight = head.weight
                inputs.teacher_lm_head_bias = getattr(head, "bias", None)
            else:
                inputs.teacher_logits = self.model(**model_inputs).logits[:, :-1]


@dataclass
class OnPolicy:
    """GKD's on-policy mixing: a share ``lmbda`` of training batches (chosen by a hash of the
    batch's ids and ``seed``, so the same batch always decides the same way) replace each
    sample's LAST trained span by the student's own sampled completion (at most as many tokens
    as the span; it ends at the student's end-of-sequence token or there), which the teacher then
    scores. Earlier trained spans (concat multi-turn) keep their tokens and labels."""

    lmbda: float
    seed: int
    pad_token_id: int
    temperature: float = 1.0
    generated: int = field(default=0, init=False)  # batches generated so far (for tests and logs)

    def wants(self, batch: Mapping[str, Any]) -> bool:
        if self.lmbda <= 0:
            return False
        if self.lmbda >= 1:
            return True
        return self._batch_hash(b"", batch["input_ids"]) / 2**64 < self.lmbda

    def _batch_hash(self, purpose: bytes, ids: torch.Tensor) -> int:
        """A 64-bit hash of ``purpose``, ``seed`` and the batch's token ids: the same batch always
        gives the same value, whatever ran before."""
        data = purpose + self.seed.to_bytes(8, "little") + ids.detach().cpu().contiguous().numpy().tobytes()
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")

    @torch.no_grad()
    def complete(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with each row's last trained span replaced by the student's sample."""
        student: Any = getattr(model, "module", model)  # (DDP: generate with the wrapped module)
        labels, ids = batch["labels"], batch["input_ids"]
        weights = batch.get("weights")
        trained = labels != IGNORE_INDEX  # (B, T)
        last: dict[int, tuple[int, int]] = {}  # row -> (start, length) of its last trained span
        for row in range(ids.shape[0]):
            where = trained[row].nonzero().flatten().tolist()
            if not where:
                continue
            end = start = where[-1]
            while start > 0 and bool(trained[row, start - 1]):
                start -= 1
            if start > 0:  # (a span at the very start has no text to continue)
                last[row] = (start, end - start + 1)
        rows = sorted(last)
        if not rows:
            return batch
        width = max(last[r][0] for r in rows)
        prompt = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=ids.device)
        attention = torch.zeros_like(prompt)
        for i, r in enumerate(rows):
            s = last[r][0]
            prompt[i, width - s :] = ids[r, :s]
            attention[i, width - s :] = 1
        was_training = student.training
        student.eval()
        # sampled from a generator of its own, seeded by the batch: the same completions whatever
        # ran before (the Trainer restores a resumed run's random state only after drawing the
        # step's batches, where this runs), and the training's random stream is left as it was
        sample_seed = self._batch_hash(b"complete", ids) >> 1
        devices = [ids.device] if ids.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(sample_seed)
                out = student.generate(
                    input_ids=prompt,
                    attention_mask=attention,
                    max_new_tokens=max(last[r][1] for r in rows),
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=self.pad_token_id,
                )
        finally:
            student.train(was_training)
        eos = student.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        new = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for i, r in enumerate(rows):
            s, n = last[r]
            gen = out[i, width : width + n].tolist()
            cut = next((j + 1 for j, t in enumerate(gen) if t in eos_ids), len(gen))
            gen = gen[:cut]
            w = float(weights[r, s]) if weights is not None else 1.0
            end = s + len(gen)
            tokens = torch.tensor(gen, dtype=torch.long, device=ids.device)
            new["input_ids"][r, s:end] = tokens
            new["input_ids"][r, end:] = self.pad_token_id
            new["labels"][r, s:end] = tokens
            new["labels"][r, end:] = IGNORE_INDEX
            if "attention_mask" in new:
                new["attention_mask"][r, :end] = 1
                new["attention_mask"][r, end:] = 0
            if weights is not None:
                new["weights"][r, s:end] = w
                new["weights"][r, end:] = 0.0
            if SPANS in new:
                spans = new[SPANS]
                spans[spans[:, 0] == r, 2] = end
        self.generated += 1
        return new


@dataclass
class DistillForward:
    """``(model, batch) -> LossInputs``: the student's next-token inputs (:class:`NextTokenForward`)
    plus the teacher's (:class:`TeacherSide`); on-policy completions (``policy``) are made by
    :meth:`prepare_training_batch` when the Trainer draws a training step's batches."""

    student: NextTokenForward
    teacher: TeacherSide
    policy: OnPolicy | None = None

    def prepare_training_batch(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The training batch with on-policy completions when ``policy`` picks it. Called by
        :meth:`LosslabTrainer.get_batch_samples <losslab.train.trainer.LosslabTrainer.get_batch_samples>`
        before the step's trained tokens are counted, so that the loss divides by the tokens it
        is computed on (a completion ends at the student's end-of-sequence token, often before
        the data's answer would have)."""
        if self.policy is not None and self.policy.wants(batch):
            return self.policy.complete(model, batch)
        return batch

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
        model_inputs = {k: v for k, v in batch.items() if k not in (SPANS, TOPK_LOGITS, TOPK_INDICES)}
        inputs = self.student(model, model_inputs)
        teacher_inputs = {k: v for k, v in model_inputs.items() if k not in ("labels", "weights")}
        self.teacher.fill(inputs, batch, teacher_inputs)
        return inputs
