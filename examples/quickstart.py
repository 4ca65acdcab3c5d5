"""Quickstart (stand-in until `losslab train`/`compare` land): data, model, a masked sample, one step."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from losslab.data.builtin import prepare, resolve_data_path
from losslab.data.records import load_records
from losslab.data.schemas import ChatRecord
from losslab.losses import token_cross_entropy
from losslab.models import load_causal_lm, load_tokenizer

MODEL = "builtin:smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    for m in prepare():
        print(f"data: {m['name']:<22} {m['records']:>6} records  (train {m['splits']['train']})")
    tokenizer = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL)
    _, record = next(iter(load_records(resolve_data_path("builtin:chitchat", "train"), ChatRecord)))
    messages = [m.model_dump(exclude_none=True) for m in record.messages[:4]]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    ids = enc["input_ids"]
    # assistant content + its closing <|im_end|> are trained (the masking module does this for any template)
    spans, pos = [], 0
    for m in messages:
        start_c = text.index(m["content"], pos)
        pos = start_c + len(m["content"])
        if m["role"] == "assistant":
            spans.append((start_c, pos + len(tokenizer.eos_token)))
    offsets = enc["offset_mapping"][0]
    trained = torch.tensor([any(a <= s < b for a, b in spans) for s, _ in offsets.tolist()])
    labels = torch.where(trained, ids[0], -100).unsqueeze(0)
    shown = "".join(
        f"[{tokenizer.decode([t])}]" if k else tokenizer.decode([t]) for t, k in zip(ids[0].tolist(), trained.tolist())
    )
    print("\nmasked sample ([trained] tokens):\n" + shown)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses = []
    for _ in range(2):
        logits = model(input_ids=ids).logits
        loss = token_cross_entropy(logits[:, :-1], labels[:, 1:])
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    summary = {"model": MODEL, "trained_tokens": int(trained.sum()), "tokens": ids.shape[1],
               "loss_before_step": losses[0], "loss_after_step": losses[1], "seconds": round(time.time() - start, 1)}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nloss on the assistant tokens: {losses[0]:.4f} -> {losses[1]:.4f} after one AdamW step")
    print(f"results: {out / 'quickstart.json'}")


if __name__ == "__main__":
    main()
