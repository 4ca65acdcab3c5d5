"""losslab's masks and loss inside your own ``transformers.Trainer``.

The masks come from ``losslab.masking`` (assistant turns of a chat, under the tokenizer's own
chat template), the loss is a losslab composite (cross-entropy with label smoothing plus a
scheduled consistency term) given to a plain Trainer as its ``compute_loss_func``, and
``LossTermsCallback`` logs every term. ``losslab train`` does all of this from a YAML file
(docs/training.md); this is for people who keep their own training script.

    python examples/quickstart.py --out runs/quickstart [--model builtin:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from losslab.losses import build_composite
from losslab.masking import MaskConfig, PaddedCollator, build_samples
from losslab.models import load_causal_lm, load_tokenizer
from losslab.train.next_token import causal_lm_loss
from losslab.train.trainer import JsonlLogCallback, LossTermsCallback

CHATS = [
    [
        ("user", "Hi! How are you today?"),
        ("assistant", "I'm well, thanks. And you?"),
        ("user", "Tired, but fine."),
        ("assistant", "Get some rest tonight, then."),
    ],
    [("user", "What is your favourite colour?"), ("assistant", "Blue, like the sea.")],
    [
        ("user", "Do you like music?"),
        ("assistant", "Yes, mostly jazz."),
        ("user", "Who?"),
        ("assistant", "Miles Davis, above all."),
    ],
    [("user", "Good night!"), ("assistant", "Good night, sleep well.")],
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: %(default)s)")
    parser.add_argument("--model", default="builtin:tiny-llama", help="causal LM (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (default: %(default)s)")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    records = [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in CHATS]
    samples = build_samples(records, tokenizer, MaskConfig(mask="assistant"))
    # a plain Trainer passes every batch key to the model: keep ids, labels and the attention mask
    pad = PaddedCollator(tokenizer.pad_token_id)

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in pad(batch).items() if k in ("input_ids", "attention_mask", "labels")}

    loss = causal_lm_loss(
        build_composite(
            [
                {"name": "token_cross_entropy", "label_smoothing": 0.1},
                {"name": "consistency", "weight": {"schedule": "linear", "start": 0.3, "end": 0.0}},
            ],
            total_steps=args.steps,
        ),
        model=model,
    )
    out = Path(args.out)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out),
            max_steps=args.steps,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=samples,
        data_collator=collate,
        compute_loss_func=loss,
        callbacks=[LossTermsCallback(loss), JsonlLogCallback(out / "log.jsonl")],
    )
    trainer.train()
    steps = [r for r in trainer.state.log_history if "loss/token_cross_entropy" in r]
    for r in steps:
        print(
            json.dumps(
                {
                    k: round(v, 4) if isinstance(v, float) else v
                    for k, v in r.items()
                    if k == "step" or k.startswith(("loss", "weight/"))
                }
            )
        )
    print(f"log: {out / 'log.jsonl'}")
    return {"steps": steps, "samples": samples}


if __name__ == "__main__":
    main()
