"""Labels from a real peer: TRL 1.16.0's SFT data path (``assistant_only_loss=True``) on chit-chat
records under SmolLM2's template.

- With a copy of the template that has ``{% generation %}`` markers around each reply and its
  ``<|im_end|>``, TRL's prepared dataset and its collator's batches agree with losslab's mask
  token for token: no finding, every record agreeing, the same trained-token count.
- With the stock template (no markers), TRL refuses to build the trainer (its
  ``get_training_chat_template`` knows no patch for SmolLM2's template), and the assistant mask
  transformers computes for it is all zeros; TRL's own label building on that mask trains
  nothing, which the audit reports (``labels_empty`` and one ``labels_zero_targets`` per record).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from losslab.audit.dump import dump_labels

from .conftest import CHITCHAT, TAGGED_TEMPLATE, run_audit

trl = pytest.importorskip("trl")
RECORDS = [json.loads(line) for line in CHITCHAT.read_text(encoding="utf-8").splitlines()]


def sft_trainer(tokenizer: Any, dataset: Any, tmp_path: Path, **config: Any) -> Any:
    from trl import SFTConfig, SFTTrainer

    from losslab.models import load_causal_lm

    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None, **config
    )
    return SFTTrainer(
        model=load_causal_lm("builtin:tiny-llama"), args=args, train_dataset=dataset, processing_class=tokenizer
    )


def test_trl_labels_with_generation_markers_agree(tmp_path: Path, smollm2_tokenizer: Any, capsys) -> None:
    import copy

    import torch
    from datasets import Dataset

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = TAGGED_TEMPLATE.read_text(encoding="utf-8")
    trainer = sft_trainer(tokenizer, Dataset.from_list(RECORDS), tmp_path, assistant_only_loss=True)
    assert trl.__version__ == "1.16.0"
    rows = tmp_path / "rows.jsonl"
    assert dump_labels(trainer.train_dataset, rows) == len(RECORDS)
    status, report = run_audit(capsys, str(CHITCHAT), "--labels", str(rows))
    assert status == 0 and report["findings"] == []
    totals = report["tables"]["totals"][0]
    assert totals["records agreeing"] == totals["records"] == len(RECORDS)
    assert totals["trained by the labels"] == totals["trained by losslab"] > 0
    trained_by_trl = sum(sum(x != -100 for x in row["labels"][1:]) for row in trainer.train_dataset)
    assert totals["trained by the labels"] == trained_by_trl

    # what the loss sees: the collator's padded batches, in order (padding dropped by attention_mask)
    loader = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=3, collate_fn=trainer.data_collator)
    batches = tmp_path / "batches.jsonl"
    assert dump_labels(loader, batches) == len(RECORDS)
    status, report = run_audit(capsys, str(CHITCHAT), "--labels", str(batches))
    assert status == 0 and report["findings"] == []


def test_trl_stock_template_refused_and_its_empty_mask_reported(tmp_path: Path, smollm2_tokenizer: Any, capsys) -> None:
    from datasets import Dataset

    with pytest.raises(ValueError, match="patching is not supported for this template"):
        sft_trainer(smollm2_tokenizer, Dataset.from_list(RECORDS), tmp_path, assistant_only_loss=True)

    # the assistant mask transformers computes for the stock template: all zeros
    tokenised = [
        smollm2_tokenizer.apply_chat_template(
            r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        for r in RECORDS
    ]
    assert all(sum(t["assistant_masks"]) == 0 for t in tokenised)
    masks = tmp_path / "masks.jsonl"
    dump_labels(({"input_ids": t["input_ids"], "assistant_masks": t["assistant_masks"]} for t in tokenised), masks)
    # TRL's own label building on that pre-tokenised dataset: every label -100
    pretokenised = Dataset.from_list([{k: t[k] for k in ("input_ids", "assistant_masks")} for t in tokenised])
    trainer = sft_trainer(smollm2_tokenizer, pretokenised, tmp_path)
    labels = tmp_path / "labels.jsonl"
    dump_labels(trainer.train_dataset, labels)
    assert all(set(row["labels"]) == {-100} for row in trainer.train_dataset)

    for given in (masks, labels):
        status, report = run_audit(capsys, str(CHITCHAT), "--labels", str(given))
        assert status == 1
        kinds = [f["kind"] for f in report["findings"]]
        assert kinds == ["labels_empty"] + ["labels_zero_targets"] * len(RECORDS)
        assert report["findings"][0]["details"]["records"] == len(RECORDS)
        assert [f["where"] for f in report["findings"][1:]] == [f"{CHITCHAT}:{i}" for i in range(1, len(RECORDS) + 1)]
        totals = report["tables"]["totals"][0]
        assert totals["trained by the labels"] == 0 and totals["records agreeing"] == 0
        assert sum(f["count"] for f in report["findings"][1:]) == totals["trained by losslab"] > 0
