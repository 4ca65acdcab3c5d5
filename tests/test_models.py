"""The builtin models load offline, have the right special tokens, and train."""

from __future__ import annotations

import pytest
import torch

from losslab import models
from losslab.errors import UserError


@pytest.mark.parametrize(
    "name",
    [
        # SmolLM2's forward + backward is ~25-45 s of one core; its weights are checked in the default
        # suite by test_smollm2_cache_equals_gguf, its training by the slow example runs
        pytest.param("builtin:smollm2-135m-instruct", marks=pytest.mark.slow),
        "builtin:tiny-llama",
    ],
)
def test_causal_lm_forward_backward(name: str) -> None:
    model = models.load_causal_lm(name)
    tokenizer = models.load_tokenizer(name)
    batch = tokenizer(["Hello there, how are you?"], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_smollm2_is_the_real_model(smollm2_tokenizer) -> None:
    model = models.load_causal_lm("builtin:smollm2-135m-instruct")
    cfg = model.config
    assert (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers) == (576, 49152, 30)
    assert not hasattr(cfg, "quantization_config")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    # a pretrained instruct model answers a greeting sensibly: low loss on a plain reply
    text = smollm2_tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ],
        tokenize=False,
    )
    ids = smollm2_tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss < 5.0, "a random or mis-loaded model would be near log(49152) = 10.8"


def test_smollm2_cache_equals_gguf() -> None:
    """The plain safetensors cache holds exactly the dequantised GGUF weights."""
    from transformers import AutoModelForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(
        str(models._smollm2_dir()), gguf_file=models.SMOLLM2_GGUF, dtype=torch.float32
    )
    cached = models.load_causal_lm("builtin:smollm2-135m-instruct")
    ids = torch.tensor([[1, 520, 3134, 282, 253, 4523, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, gguf(input_ids=ids).logits, rtol=0, atol=0)


def test_smollm2_tokenizer_special_tokens(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.is_fast
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == 2
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")
    ids = tok(rendered)["input_ids"]
    assert ids.count(tok.eos_token_id) == 3  # system, user and assistant turns each end with <|im_end|>


def test_minilm_encoder_forward_backward() -> None:
    from transformers import AutoModel, AutoTokenizer

    path = models.resolve("builtin:minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    assert model.config.model_type == "bert"
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 23.5e6
    batch = tokenizer(["a happy dog", "a joyful puppy", "quarterly tax filing"], padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2, "the real sentence encoder puts paraphrases closer"
    sims.sum().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused == {"pooler.dense.weight", "pooler.dense.bias"}  # mean pooling skips BERT's pooler


def test_tiny_llama_is_deterministic(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOSSLAB_CACHE", str(tmp_path))
    fresh = models.load_causal_lm("builtin:tiny-llama")
    monkeypatch.delenv("LOSSLAB_CACHE")
    cached = models.load_causal_lm("builtin:tiny-llama")
    for (name, a), (_, b) in zip(fresh.state_dict().items(), cached.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_unknown_builtin_lists_choices() -> None:
    with pytest.raises(UserError, match="builtin:smollm2-135m-instruct"):
        models.resolve("builtin:gpt-5")


def test_local_path_passes_through(tmp_path) -> None:
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    assert models.resolve("org/some-hub-model") == "org/some-hub-model"
