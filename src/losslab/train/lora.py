"""LoRA adapters (through PEFT) and gradient checkpointing for the causal-LM tasks.

- :func:`prepare_policy`: the model a causal-LM task trains (``config.model`` as loaded; for
  ``distill`` the student, perhaps built from the teacher), with LoRA adapters when the config
  has a ``lora`` section (every base weight frozen, the LM head too, so the fused heads take
  their frozen-weight path and compute no weight gradient).
- :func:`check_targets` / :func:`check_lora`: ``lora.target_modules`` against the model's
  module names, before training (:func:`check_lora` on a weightless copy of the model, before
  any data or weight is read). A name that matches no module, or the LM head, is a
  :class:`~losslab.errors.UserError` listing the modules that can take adapters.
- :class:`AdaptersDisabled`: the reference model of the preference task under LoRA: the policy
  itself with its adapters switched off (PEFT's ``disable_adapter()``), no second copy.
- :func:`enable_gradient_checkpointing`: ``training.gradient_checkpointing``.
- :func:`save_merged`: ``lora.merge``: the merged full model as safetensors.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from losslab.errors import UserError

if TYPE_CHECKING:
    from losslab.train.config import LoraConfig, TrainConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "model_merged"


M = TypeVar("M", bound=torch.nn.Module)


def prepare_policy(model: M, config: TrainConfig) -> M:
    """The causal LM a task trains (``config.model``, or a ``distill`` student), wrapped in LoRA
    adapters when ``config.lora`` is set (a ``peft.PeftModelForCausalLM``; only the adapters
    train), else itself.
    Typed as the model it wraps: PEFT forwards every attribute it does not have (``config``,
    ``get_output_embeddings``, ``generate``) to the wrapped model."""
    if config.lora is None:
        return model
    wrapped = with_lora(model, config.lora)
    print(f"lora: r={config.lora.r}, alpha={config.lora.alpha:g}: {trainable_summary(wrapped)}")
    return cast(M, wrapped)


def with_lora(model: torch.nn.Module, lora: LoraConfig, *, where: str = "lora.target_modules") -> torch.nn.Module:
    """``model`` with LoRA adapters on ``lora.target_modules`` (checked first, see
    :func:`check_targets`); every other parameter gets ``requires_grad=False``. Each adapter
    adds ``(alpha / r) B A x`` to its layer's output, ``A`` (r, d_in) random, ``B`` (d_out, r) zero,
    so the wrapped model starts out computing exactly what ``model`` computes."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = check_targets(model, lora.target_modules, where=where)
    alpha: Any = lora.alpha  # (PEFT annotates an int; any positive number works)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def adapter_candidates(model: torch.nn.Module) -> list[str]:
    """The last names of the layers that can take adapters (linear, embedding, 1-D conv), in order."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, Conv1D)
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, kinds):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)  # PEFT's rule for a list of names


def check_targets(
    model: torch.nn.Module, targets: list[str] | str | None, *, where: str = "lora.target_modules"
) -> list[str] | str | None:
    """``targets`` as PEFT takes them, after checking each name matches a layer of ``model`` and
    none is the LM head (the fused loss head and the preference scoring read the head's own
    weight, so an adapter there would not be trained). ``None`` resolves to PEFT's default for the
    architecture; ``all-linear`` passes through (PEFT leaves the LM head out)."""
    head = _output_embeddings(model)
    named = [(name, module) for name, module in model.named_modules() if name]
    candidates = adapter_candidates(model)
    head_names = [name for name, module in named if head is not None and module is head]
    if targets is None:
        targets = _peft_default(model)
        if targets is None:
            raise UserError(
                f"PEFT has no default LoRA targets for {type(model).__name__}; name them, e.g. "
                f"target_modules: [{', '.join(candidates[:2])}] (layers of this model: {', '.join(candidates)})",
                where=where,
            )
        return targets
    if isinstance(targets, str):
        return targets
    unknown = [t for t in targets if not any(_matches(name, t) for name, _ in named)]
    if unknown:
        raise UserError(
            f"{', '.join(repr(t) for t in unknown)} match{'es' if len(unknown) == 1 else ''} no module of "
            f"{type(model).__name__}; layers that can take adapters: {', '.join(candidates)}",
            where=where,
        )
    on_head = [t for t in targets if any(_matches(name, t) for name in head_names)]
    if on_head:
        raise UserError(
            f"{', '.join(repr(t) for t in on_head)} is the LM head; LoRA on the LM head is not supported (the fused "
            "loss head reads its weight); leave it out",
            where=where,
        )
    return list(targets)


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _peft_default(model: torch.nn.Module) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = DEFAULTS.get(model_type) if model_type else None
    return list(found) if found else None


def check_lora(config: TrainConfig, *, where: str = "lora.target_modules") -> None:
    """:func:`check_targets` on a weightless copy of ``config.model`` (built on the meta device
    from its config.json; for a ``distill`` student built from the teacher's layers, the
    teacher's with the student's depth), before any data or weight is read; nothing when ``config.lora`` is
    unset. A model whose configuration cannot be read here is checked when it is loaded."""
    if config.lora is None:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from losslab.models import resolve

    teacher = config.distill.teacher
    student = config.distill.student if teacher is not None else None
    name = teacher if student is not None and teacher is not None else config.model
    try:
        model_config = AutoConfig.from_pretrained(resolve(name), trust_remote_code=config.trust_remote_code)
        if student is not None:
            # a student built from the teacher's layers: the teacher's module names, its depth
            # (layer indices in targets count the student's layers, renumbered from 0)
            from losslab.train.tasks.distill_models import layers_to_keep

            kept = layers_to_keep(student.keep_layers, int(model_config.num_hidden_layers))
            model_config.num_hidden_layers = len(kept)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    except UserError:
        raise
    except Exception:  # noqa: BLE001  (any failure to build a skeleton: the load-time check still runs)
        return
    check_targets(skeleton, config.lora.target_modules, where=where)


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (adapters)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_summary(model: torch.nn.Module) -> str:
    """``N trainable of M parameters (p %)``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(1, total):.2f} %)"


class AdaptersDisabled(torch.nn.Module):
    """A PEFT model seen with its adapters off: the base model, without a copy.

    ``forward`` runs the wrapped model under ``disable_adapter()``, ``torch.no_grad()`` and in eval
    mode (no dropout, as a frozen reference copy would be), then restores its mode. Parameters are
    the wrapped model's (the same tensors), so moving the view moves the policy.
    ``get_output_embeddings()`` is the base LM head, ``config`` the model's."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        if not is_peft(model):
            raise TypeError(f"AdaptersDisabled wraps a PEFT model, got {type(model).__name__}")
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():  # type: ignore[operator]
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return _output_embeddings(self.model)

    @property
    def config(self) -> Any:
        """The wrapped model's configuration (its attention implementation, dtype)."""
        return getattr(self.model, "config", None)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (``torch.utils.checkpoint``, non-reentrant)
    instead of keeping its activations; ``use_cache`` off. Under LoRA the input embeddings' output
    is made to require grad (``enable_input_require_grads``), so every checkpointed segment has an
    input with a gradient even though the embeddings are frozen."""
    peft = is_peft(model)
    base: Any = model.get_base_model() if peft else model  # type: ignore[operator]
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(
            f"{type(base).__name__} does not support gradient checkpointing; set training.gradient_checkpointing: false",
            where="training.gradient_checkpointing",
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the activation_checkpointing rename
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if peft:
        base.enable_input_require_grads()
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


def save_merged(model: torch.nn.Module, tokenizer: Any, target: str | os.PathLike[str]) -> Path:
    """The adapters merged into the base weights (``W + (alpha / r) B A``), saved as a plain
    model (safetensors, config.json, the tokenizer) into ``target``, through a temporary folder
    renamed into place. Merges in place: ``model`` no longer has adapters afterwards."""
    from losslab.train.checkpoints import fsync_tree

    target = Path(target)
    merged = model.merge_and_unload()  # type: ignore[operator]
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
