"""The ``preference`` task's evaluation: reward accuracy, margin, rewards and log-probs on
held-out pairs (``predictions_<split>.jsonl`` per pair), and with ``eval.generate`` replies
sampled to held-out prompts, scored by VADER (``reward``) with their sequence KL to the
reference (``kl``) (``generations_<split>.jsonl`` per reply).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from losslab.eval.report import namespace
from losslab.eval.sentiment import vader_compound
from losslab.files import write_atomic
from losslab.train.config import TrainConfig
from losslab.train.tasks.preference_forward import (
    PreferenceCollator,
    PreferenceForward,
    batch_pairs,
    collated_on,
    device_of,
    output_embeddings,
    sequence_sums,
)
from losslab.train.tasks.preference_reference import load_reference, reference_columns

METRICS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected")
GENERATION_METRICS = ("reward", "kl")
GENERATION_SEED = 1234


@dataclass
class Evaluator:
    """``evaluate(model, dataset, split)``: reward accuracy, margin, rewards and log-probs on the
    held-out pairs (unpaired items: desirable vs undesirable ones), and with ``eval.generate``
    the VADER reward of sampled replies and their sequence KL to the reference."""

    config: TrainConfig
    tokenizer: Any
    collator: PreferenceCollator
    forward: PreferenceForward
    mode: str
    reference: torch.nn.Module | None = field(default=None, repr=False)

    def __call__(self, model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        metrics = self.reward_metrics(model, dataset, split)
        if self.config.eval.generate:
            metrics.update(self.generation_metrics(model, dataset, split))
        return namespace(metrics, split)

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, dataset: list[dict]) -> list[dict[str, float]]:
        """Per feature: the policy's and reference's log-probs of both completions and the rewards."""
        was_training = model.training
        model.eval()
        rows: list[dict[str, float]] = []
        batch_size = self.config.training.eval_batch_size or self.config.training.batch_size
        try:
            for start in range(0, len(dataset), batch_size):
                features = dataset[start : start + batch_size]
                batch = collated_on(self.collator, features, device_of(model))
                b = batch_pairs(batch)
                sums, counts, _ = sequence_sums(model, self.forward.head, batch)
                refs = self.forward.reference_columns(batch) if self.forward.reference is not None else {}
                refs.update({k: batch[k] for k in reference_columns(self.forward.unpaired) if k in batch})
                first, second = reference_columns(self.forward.unpaired)
                r1 = self.forward.rewards(sums[:b], counts[:b], refs.get(first))
                r2 = self.forward.rewards(sums[b:], counts[b:], refs.get(second))
                for i in range(b):
                    rows.append(
                        {
                            "logps": float(sums[i]),
                            "other_logps": float(sums[b + i]),
                            "reward": float(r1[i]),
                            "other_reward": float(r2[i]),
                        }
                    )
        finally:
            model.train(was_training)
        return rows

    def reward_metrics(self, model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        rows = self.scores(model, dataset)
        if self.forward.unpaired:
            return self.unpaired_metrics(dataset, rows, split)
        chosen = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
        rejected = torch.tensor([r["other_reward"] for r in rows], dtype=torch.float64)
        save_rows = [
            {
                "prompt": f["prompt_text"],
                "chosen": f["chosen_text"],
                "rejected": f["rejected_text"],
                "reward_chosen": r["reward"],
                "reward_rejected": r["other_reward"],
                "logps_chosen": r["logps"],
                "logps_rejected": r["other_logps"],
                **cluster_of(f),
            }
            for f, r in zip(dataset, rows)
        ]
        self.save(f"predictions_{split}.jsonl", save_rows)
        return pair_metrics(chosen, rejected, [r["logps"] for r in rows], [r["other_logps"] for r in rows])

    def unpaired_metrics(self, dataset: list[dict], rows: list[dict[str, float]], split: str) -> dict[str, float]:
        """Items unpaired from pairs are paired again (``pair``); truly unpaired items give the
        desirable vs undesirable means, accuracy = the share of rewards on the right side of 0."""
        self.save(
            f"predictions_{split}.jsonl",
            [
                {
                    "prompt": f["prompt_text"],
                    "completion": f["completion_text"],
                    "desirable": bool(f["desirable"]),
                    "reward": r["reward"],
                    "logps": r["logps"],
                    **cluster_of(f),
                }
                for f, r in zip(dataset, rows)
            ],
        )
        if all("pair" in f for f in dataset):
            by_pair: dict[int, dict[bool, dict[str, float]]] = {}
            for f, r in zip(dataset, rows):
                by_pair.setdefault(int(f["pair"]), {})[bool(f["desirable"])] = r
            whole = [p for p in by_pair.values() if len(p) == 2]
            if whole:
                return pair_metrics(
                    torch.tensor([p[True]["reward"] for p in whole], dtype=torch.float64),
                    torch.tensor([p[False]["reward"] for p in whole], dtype=torch.float64),
                    [p[True]["logps"] for p in whole],
                    [p[False]["logps"] for p in whole],
                )
        desirable = torch.tensor([bool(f["desirable"]) for f in dataset])
        rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
        logps = torch.tensor([r["logps"] for r in rows], dtype=torch.float64)

        def mean(values: torch.Tensor) -> float:
            return float(values.mean()) if values.numel() else float("nan")

        return {
            "reward_accuracy": float(torch.where(desirable, rewards > 0, rewards < 0).double().mean()),
            "reward_margin": mean(rewards[desirable]) - mean(rewards[~desirable]),
            "reward_chosen": mean(rewards[desirable]),
            "reward_rejected": mean(rewards[~desirable]),
            "logps_chosen": mean(logps[desirable]),
            "logps_rejected": mean(logps[~desirable]),
        }

    def save(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not is_main_process():
            return
        write_atomic(
            Path(self.config.output_dir) / name,
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
        )

    # -- generations ----------------------------------------------------------------------------------

    def reference_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The reference for the KL: the on-the-fly one, else loaded for the occasion (and kept)."""
        if self.forward.reference is not None:
            return self.forward.reference
        if self.reference is None:
            from losslab.train.lora import is_peft

            # under LoRA: the policy with its adapters disabled, no copy
            self.reference = load_reference(self.config, like=model if is_peft(model) else None)
        self.reference.to(device_of(model))
        return self.reference

    def generation_metrics(self, model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        """Sampled replies (a fixed seed per split, temperature 1, no top-k/top-p: draws from the
        policy) to ``eval.generation_samples`` prompts spread evenly over the split; ``reward``: their mean VADER compound
        score; ``kl``: the mean over replies of log pi(y|x) - log pi_ref(y|x), summed over the
        reply's tokens (its end-of-turn token included)."""
        held_out = held_out_prompts(dataset)
        held_out = [held_out[i] for i in spread(len(held_out), self.config.eval.generation_samples)]
        prompts = [h.input_ids for h in held_out]
        seed = GENERATION_SEED + zlib.crc32(split.encode())  # the same draws for every variant of a study
        replies = sample_replies(model, self.tokenizer, prompts, self.config.eval.max_new_tokens, seed=seed)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
        rewards = vader_compound(texts)
        items = [{"prompt": p, "completion": r} for p, r in zip(prompts, replies)]
        policy = completion_logps(model, self.forward.head, items, self.collator.pad_id)
        reference = self.reference_model(model)
        ref_head = output_embeddings(reference)
        ref = completion_logps(reference, ref_head, items, self.collator.pad_id)
        ratios = [p - r for p, r in zip(policy, ref)]
        self.save(
            f"generations_{split}.jsonl",
            [
                {
                    "prompt": self.tokenizer.decode(h.input_ids),
                    "reference": h.reference,
                    "hypothesis": t,
                    "reward": w,
                    "kl": q,
                    **({"cluster": h.cluster} if h.cluster is not None else {}),
                }
                for h, t, w, q in zip(held_out, texts, rewards, ratios)
            ],
        )
        n = max(1, len(rewards))
        return {"reward": sum(rewards) / n, "kl": sum(ratios) / n}


@dataclass
class HeldOutPrompt:
    """A held-out prompt to sample replies to: its token ids, the answer a human preferred
    (shown beside the replies) and the record's ``cluster`` (None: it has none)."""

    input_ids: list[int]
    reference: str
    cluster: str | int | None = None


def held_out_prompts(dataset: list[dict[str, Any]]) -> list[HeldOutPrompt]:
    """The held-out examples to sample replies for, each a prompt with the answer a human
    preferred: every pair with its chosen reply; of unpaired items, the desirable ones with their
    completion (items unpaired from pairs: one per pair, the chosen one, as for the pairs
    themselves), never a reply labelled undesirable. A split with no desirable item gives all
    its items, with no reference (``""``)."""
    if all("chosen_text" in f for f in dataset):
        return [HeldOutPrompt(f["prompt"], f["chosen_text"], f.get("cluster")) for f in dataset]
    desirable = [f for f in dataset if f["desirable"]]
    if not desirable:
        return [HeldOutPrompt(f["prompt"], "", f.get("cluster")) for f in dataset]
    return [HeldOutPrompt(f["prompt"], f["completion_text"], f.get("cluster")) for f in desirable]


def cluster_of(feature: dict[str, Any]) -> dict[str, Any]:
    """``{"cluster": ...}`` of a feature whose record has one, else ``{}`` (for saved rows)."""
    return {"cluster": feature["cluster"]} if "cluster" in feature else {}


def spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (the first one is 0): held-out files
    are often grouped by source, and the first k records would all be from one."""
    k = min(n, k)
    return [i * n // k for i in range(k)]


def pair_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, logps_chosen: list[float], logps_rejected: list[float]
) -> dict[str, float]:
    """Reward accuracy (ties half), mean margin and rewards, mean log-probs of N pairs."""
    return {
        "reward_accuracy": float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
        "logps_chosen": sum(logps_chosen) / max(1, len(logps_chosen)),
        "logps_rejected": sum(logps_rejected) / max(1, len(logps_rejected)),
    }


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


@torch.no_grad()
def sample_replies(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    seed: int,
    batch_size: int = 16,
) -> list[list[int]]:
    """Sampled replies (token ids, up to and including the end-of-turn token) to token-id
    prompts, left-padded in batches; reproducible: the random state is forked and seeded."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    stops = set(eos) if isinstance(eos, list) else {eos}
    replies: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                group = prompts[start : start + batch_size]
                width = max(len(p) for p in group)
                ids = torch.full((len(group), width), pad, dtype=torch.long)
                attention = torch.zeros_like(ids)
                for row, p in enumerate(group):
                    ids[row, width - len(p) :] = torch.tensor(p)
                    attention[row, width - len(p) :] = 1
                out = model.generate(  # type: ignore[operator]
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=pad,
                )
                for row in range(len(group)):
                    reply = out[row, width:].tolist()
                    end = next((i for i, t in enumerate(reply) if t in stops), None)
                    replies.append(reply[: end + 1] if end is not None else reply)
    finally:
        model.train(was_training)
    return replies


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module, head: torch.nn.Module, items: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16
) -> list[float]:
    """log pi(completion | prompt) summed over the completion's tokens, per item (one row each)."""
    from losslab.train.tasks.pair_rows import item_batch

    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(items), batch_size):
            group = items[start : start + batch_size]
            batch = item_batch(group, layout="padded", pad_id=pad_id)
            batch = {k: v.to(device_of(model)) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out.extend(sequence_sums(model, head, batch)[0].tolist())
    finally:
        model.train(was_training)
    return out
