"""The ``distill`` task's two models: the vocabulary check between teacher and student, the
student built from the teacher's layers (``distill.student``), and the frozen teacher."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import torch
from transformers import PreTrainedModel

from losslab.errors import UserError
from losslab.models import load_causal_lm, load_tokenizer, resolve
from losslab.train.config import TrainConfig

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def student_name(config: TrainConfig) -> str:
    """The model whose tokenizer the student uses: the teacher's when it is built from it."""
    assert config.distill.teacher is not None  # (checked by TrainConfig)
    return config.distill.teacher if config.distill.student is not None else config.model


def check_vocabularies(config: TrainConfig) -> None:
    """:class:`UserError` naming both models when teacher and student do not share a vocabulary
    (the tokens, their ids and the output size); a student built from the teacher shares it."""
    teacher = config.distill.teacher
    assert teacher is not None
    if config.distill.student is None:
        _same_vocabulary(teacher, config.model, config.trust_remote_code)


@functools.lru_cache(maxsize=16)
def _same_vocabulary(teacher: str, student: str, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    if teacher == student:
        return
    a = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    b = load_tokenizer(student, trust_remote_code=trust_remote_code)
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    size_a = getattr(
        AutoConfig.from_pretrained(resolve(teacher), trust_remote_code=trust_remote_code), "vocab_size", None
    )
    size_b = getattr(
        AutoConfig.from_pretrained(resolve(student), trust_remote_code=trust_remote_code), "vocab_size", None
    )
    if vocab_a == vocab_b and size_a == size_b:
        return
    if vocab_a != vocab_b:
        differ = sum(1 for token, i in vocab_a.items() if vocab_b.get(token) != i) + len(set(vocab_b) - set(vocab_a))
        what = f"tokenizers of {len(vocab_a)} and {len(vocab_b)} tokens, {differ} token ids differ"
    else:
        what = f"the same tokenizer, but output layers of {size_a} and {size_b} logits"
    raise UserError(
        f"teacher {teacher!r} and student (model) {student!r} have different vocabularies ({what}); distillation "
        "compares their next-token distributions id by id, so both must use one tokenizer. losslab has no "
        "vocabulary mapping: pick a student of the teacher's family, or build it from the teacher "
        "(distill.student: {init_from: teacher, keep_layers: even})",
        where="distill.teacher",
    )


def layers_to_keep(keep: str | list[int], total: int) -> list[int]:
    """``even`` (0, 2, ...), ``odd`` (1, 3, ...) or the listed indices, checked against ``total``."""
    if keep == "even":
        return list(range(0, total, 2))
    if keep == "odd":
        return list(range(1, total, 2))
    assert isinstance(keep, list)
    bad = [i for i in keep if i >= total]
    if bad:
        raise UserError(
            f"layers {bad} do not exist: the teacher has {total} decoder layers (0..{total - 1}); "
            "give even, odd or a list of indices in that range",
            where="distill.student.keep_layers",
        )
    return list(keep)


def student_from_teacher(teacher: PreTrainedModel, keep: str | list[int]) -> PreTrainedModel:
    """A new model with the teacher's embeddings, norm and head and the decoder layers ``keep``
    (in the order given, renumbered 0..n-1): DistilBERT's initialisation of a shallower student.
    For models whose decoder layers are ``...layers.N...`` (Llama, Mistral, Qwen, SmolLM...)."""
    from transformers import AutoModelForCausalLM

    total = int(teacher.config.num_hidden_layers)
    kept = layers_to_keep(keep, total)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    for name in ("layer_types",):  # per-layer settings follow their layer
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, name, [value[i] for i in kept])
    new_index = {old: new for new, old in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    matched = False
    for key, value in teacher.state_dict().items():
        found = _LAYER.search(key)
        if found is None:
            state[key] = value
            continue
        matched = True
        old = int(found.group(2))
        if old in new_index:
            state[key[: found.start(2)] + str(new_index[old]) + key[found.end(2) :]] = value
    if not matched:
        raise UserError(
            f"distill.student.keep_layers: the teacher ({type(teacher).__name__}) has no parameters named "
            "layers.N (Llama-style decoder layers); build the student elsewhere and give it as model",
            where="distill.student",
        )
    # not the teacher's path: a LoRA adapter saved on this student records it as its base model
    # (adapter_config.json), and PEFT would then load the whole teacher under the student's adapters
    config.name_or_path = ""
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(state, strict=True)
    return student


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with ``requires_grad`` off (the teacher)."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_models(config: TrainConfig, *, keep_teacher: bool) -> tuple[PreTrainedModel, Any]:
    """``(student, teacher)``: the student loaded (``model``) or built from the teacher
    (``distill.student``); the frozen teacher when ``keep_teacher``, else None (never loaded
    unless the student is built from it)."""
    d = config.distill
    assert d.teacher is not None
    teacher = None
    if d.student is not None:
        teacher = load_causal_lm(d.teacher, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
        student = student_from_teacher(teacher, d.student.keep_layers)
        kept = student.config.num_hidden_layers
        print(f"student: {kept} of the teacher's {teacher.config.num_hidden_layers} layers ({d.student.keep_layers})")
    else:
        student = load_causal_lm(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if keep_teacher and teacher is None:
        teacher = load_causal_lm(d.teacher, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    return student, frozen(teacher) if keep_teacher and teacher is not None else None


def load_teacher(config: TrainConfig) -> torch.nn.Module:
    """The frozen teacher alone (for the cache's precompute), on the GPU when there is one."""
    assert config.distill.teacher is not None
    teacher = frozen(
        load_causal_lm(config.distill.teacher, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    )
    if torch.cuda.is_available():
        teacher.to("cuda")
    return teacher
