"""The schema of ``losslab train`` configs. Every field's description is its documentation."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from losslab.config import OutputDir
from losslab.train.tasks import TASKS

# loss terms that pool over a whole sample (row): wrong when packing puts several samples in a row
PER_ROW_TERMS = ("semantic_alignment", "semantic_l2")
# tasks that train a causal LM wrapped by losslab.train.lora.prepare_policy (LoRA adapters possible);
# for distill that is the student (loaded, or built from the teacher), never the teacher
LORA_TASKS = ("causal_lm", "preference", "distill")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an inf lr or epochs is never meant


class DataConfig(_Section):
    train: str = Field(description="training records: a file, or builtin:NAME (its train split)")
    validation: str | None = Field(
        None, description="validation records: a file, or builtin:NAME (its validation split)"
    )
    test: str | None = Field(None, description="test records: a file, or builtin:NAME (its test split)")
    format: Literal["auto", "chat", "instruction"] = Field(
        "auto", description="causal_lm record format; auto looks at the first record"
    )
    mask: str | None = Field(
        None,
        description="mask policy: assistant | last | all (chat), completion | all (instruction); default assistant / completion",
    )
    mask_prompt: bool = Field(True, description="instruction records: mask the prompt (false trains it too)")
    prompt_style: str = Field("chat_template", description="instruction records: chat_template | alpaca")
    strategy: Literal["auto", "concat", "expand"] = Field("auto", description="multi-turn strategy")
    role_weights: dict[str, float] | None = Field(
        None, description="per-role loss weights, e.g. {assistant: 1.0, tool: 0.5}"
    )
    template: str | None = Field(None, description="Jinja chat template file to use instead of the tokenizer's own")
    max_length: int = Field(512, ge=8, le=1 << 24, description="truncate samples to this many tokens")
    truncation: Literal["end", "start"] = Field("end", description="which end of a too-long sample is dropped")
    packing: bool = Field(False, description="pack several samples per row (padding-free)")
    max_train_samples: int | None = Field(None, ge=1, description="use only the first N training records")
    max_eval_samples: int | None = Field(None, ge=1, description="use only the first N validation/test records")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="bad records: stop with an error, or skip and count"
    )
    num_proc: int = Field(
        1,
        ge=1,
        description="causal_lm: build the samples (template, tokens, masks) in N processes "
        "through datasets.map, cached under $LOSSLAB_CACHE/prepared; 1 = in this process, no cache",
    )
    label_type: Literal["auto", "class", "multi_label", "regression"] = Field(
        "auto",
        description="sequence_classification: class (one label per text), multi_label (a list of labels per text), "
        "regression (a number); auto: a list -> multi_label, a float -> regression, else class (first training record)",
    )
    label_names: list[str] | None = Field(
        None,
        description="sequence/token classification: class or tag names in id order; "
        "default: sorted from the training data ('O' first for tags)",
    )
    use_margin: bool = Field(
        True,
        description="reward_model: pass each pair's `margin` to the loss (e.g. Bradley-Terry with margin) when records have one",
    )

    @field_validator("train", "validation", "test")
    @classmethod
    def _named(cls, spec: str | None) -> str | None:
        if spec is not None and not spec.strip():
            raise ValueError("an empty name; give a records file or builtin:NAME")
        return spec

    @field_validator("template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        """A template file must exist and compile (a syntax error names its file and line)."""
        if template is not None:
            from losslab.errors import UserError
            from losslab.masking.render import load_template

            try:
                load_template(template)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return template


class LossConfig(_Section):
    terms: list[dict[str, Any]] | None = Field(
        None,
        description="weighted loss terms: [{name, weight: number | {schedule, ...}, **options}] (docs/losses.md); "
        "unset: the task's default (token_cross_entropy for causal_lm)",
    )
    fused: bool = Field(
        True,
        description="causal_lm: compute token cross-entropy with the fused head (no N x V logits); "
        "its chunk size is the token_cross_entropy term's chunk_size",
    )


class TrainingConfig(_Section):
    max_steps: int = Field(-1, description="optimizer steps; -1 = use epochs")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (when max_steps = -1)")
    batch_size: int = Field(8, ge=1, description="per-device batch size")
    eval_batch_size: int | None = Field(
        None, ge=1, description="per-device evaluation batch size (default: batch_size)"
    )
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after the warmup (constant with a warmup is constant_with_warmup)"
    )
    warmup: float = Field(0.0, ge=0, description="warmup: steps (>= 1) or a fraction of all steps (< 1)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: once per epoch)")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (default: with evaluation)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept in output_dir")
    logging_steps: int = Field(1, ge=1, description="log loss terms every N steps")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N evaluations without improvement")
    metric_for_best_model: str = Field(
        "eval_loss",
        description="what early stopping and the best model follow: eval_loss "
        "(the weighted loss at the current schedule weights) or eval_loss/LABEL (one term)",
    )
    greater_is_better: bool = Field(False, description="direction of metric_for_best_model")
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bfloat16 mixed precision: auto = where the device supports it (not on CPU)"
    )
    dataloader_workers: int = Field(0, ge=0, description="data loader worker processes")
    fsdp: bool = Field(
        False,
        description="shard parameters, gradients and optimizer state over the processes (PyTorch FSDP, "
        "through the Trainer); run with torchrun or accelerate launch (docs/reliability.md#scale-out)",
    )
    fsdp_config: dict[str, Any] | None = Field(
        None,
        description="the Trainer's fsdp_config (e.g. {version: 2, "
        "transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}); used with fsdp: true",
    )
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="loggers besides log.jsonl: tensorboard (every loss term, weight, learning rate "
        "and eval metric as a scalar; event files in output_dir/runs/; needs `pip install tensorboard`)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in the backward pass instead of keeping them "
        "(less memory, about a third more compute); works with LoRA and full fine-tuning",
    )
    max_nonfinite_steps: int = Field(
        5,
        ge=1,
        description="optimizer steps with a NaN/inf loss or gradient are skipped "
        "(no update) and counted; the run stops at the N-th (1 = at the first), keeping its last checkpoint",
    )

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, warmup: float) -> float:
        if warmup >= 1 and warmup != int(warmup):
            raise ValueError(f"warmup is a fraction of all steps (< 1) or a whole number of steps (>= 1); got {warmup}")
        return warmup

    @field_validator("report_to")
    @classmethod
    def _installed(cls, loggers: list[str]) -> list[str]:
        if "tensorboard" in loggers and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard is not installed (pip install tensorboard)")
        return loggers


class EvalConfig(_Section):
    splits: list[Literal["validation", "test"]] = Field(
        default_factory=lambda: ["validation", "test"],  # type: ignore[arg-type]
        description="splits evaluated at the end",
    )
    generate: bool = Field(False, description="causal_lm: generate replies and score BLEU, chrF, distinct-1/2")
    max_new_tokens: int = Field(48, ge=1, description="generation length for BLEU/chrF")
    generation_samples: int = Field(32, ge=1, description="held-out prompts generated for BLEU/chrF")
    mask: str | None = Field(
        None,
        description="causal_lm: mask policy of the validation/test loss and perplexity (default: data.mask); fix it, e.g. assistant, to compare variants that train on different masks",
    )


class EmbeddingConfig(_Section):
    pooling: Literal["mean", "cls", "last"] = Field(
        "mean",
        description="embedding: sentence vector = mean of the token states, the first token's, or the last real token's",
    )
    normalize: bool = Field(True, description="embedding: L2-normalise the sentence vectors")
    context_turns: int = Field(
        1, ge=0, description="embedding: previous turns that form a reply's context (0 = all of them)"
    )
    negatives: bool | None = Field(
        None,
        description="embedding: encode an explicit negative per pair (a reply from another conversation); default: when a loss term needs one (triplet)",
    )
    recall_at: list[PositiveInt] = Field(
        min_length=1, default_factory=lambda: [1, 5, 10], description="embedding: k of the recall@k metrics"
    )


class PreferenceConfig(_Section):
    reference: Literal["auto", "model", "cache", "none"] = Field(
        "auto",
        description="preference: the reference log-probs: model (a frozen copy computes them each step), "
        "cache (computed once before training, stored under $LOSSLAB_CACHE/reference), none (reference-free "
        "losses only); auto = cache when a loss term needs them, else none",
    )
    reference_model: str | None = Field(
        None, description="preference: the reference model (default: the model being trained, before training)"
    )
    layout: Literal["shared", "concat"] = Field(
        "shared",
        description="preference: shared = prompt, chosen and rejected in one row (the prompt computed once); "
        "concat = chosen rows and rejected rows in one batch",
    )


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=1 << 16, description="LoRA rank: adapters A (r x d_in) and B (d_out x r) per target")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="modules that get adapters: names matched against the end of each module's dotted name "
        "(e.g. [q_proj, v_proj]), or all-linear (every linear layer but the LM head); "
        "default: PEFT's choice for the architecture (q_proj, v_proj for Llama)",
    )
    merge: bool = Field(
        False,
        description="also write the merged full model (base + (alpha / r) B A, safetensors) to output_dir/model_merged; "
        "output_dir/model always holds the adapter (adapter_model.safetensors, adapter_config.json)",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, targets: list[str] | str | None) -> list[str] | str | None:
        if isinstance(targets, list):
            if not targets:
                raise ValueError("an empty list; name modules (e.g. [q_proj, v_proj]), all-linear, or leave it unset")
            empty = [t for t in targets if not t.strip()]
            if empty:
                raise ValueError("an empty module name")
        return targets


class ModelSpec(_Section):
    """``model:`` written as a mapping: the name and its LoRA adapters."""

    name: str = Field(description="model name: builtin:..., a directory or a hub id")
    lora: LoraConfig | None = None


class StudentInit(_Section):
    init_from: Literal["teacher"] = Field(
        description="distill: build the student from the teacher's weights (the DistilBERT initialisation)"
    )
    keep_layers: Literal["even", "odd"] | list[int] = Field(
        "even",
        description="distill: the teacher's decoder layers the student keeps, in order: even (0, 2, 4, ...), "
        "odd (1, 3, ...) or a list of layer indices",
    )

    @field_validator("keep_layers")
    @classmethod
    def _layers(cls, layers: str | list[int]) -> str | list[int]:
        if isinstance(layers, list) and (not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers)):
            raise ValueError(
                f"keep_layers: even, odd, or a non-empty list of distinct layer indices >= 0; got {layers}"
            )
        return layers


class DistillConfig(_Section):
    teacher: str | None = Field(
        None,
        description="distill: the teacher model (builtin:..., a directory or a hub id); it must share the student's tokenizer",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        description="distill: reduce the teacher to its top-k logits per position (computed one sample at a time, "
        "live or cached); unset: the full distribution (live teacher, fused heads where the loss allows)",
    )
    cache: bool = Field(
        False,
        description="distill: compute the teacher's top-k once for every split and store it under "
        "$LOSSLAB_CACHE/teacher (needs top_k); the student then trains without the teacher in memory",
    )
    lmbda: float = Field(
        0.0,
        ge=0,
        le=1,
        description="distill: on-policy fraction (GKD's lambda): that share of training batches replace each "
        "sample's last trained span by the student's own sampled completion, which the live teacher scores",
    )
    generation_temperature: float = Field(
        1.0, gt=0, description="distill: sampling temperature of the on-policy completions (lmbda > 0)"
    )
    student: StudentInit | None = Field(
        None,
        description="distill: build the student from the teacher, e.g. {init_from: teacher, keep_layers: even}; "
        "unset: the student is `model`",
    )


class TrainConfig(_Section):
    task: str = Field("causal_lm", description=f"what is trained: {' | '.join(TASKS)}")
    model: str = Field(
        "builtin:smollm2-135m-instruct",
        description="model name: builtin:..., a directory or a hub id; or a mapping {name, lora: {r, alpha, "
        "dropout, target_modules, merge}}, read as model: NAME plus the lora section",
    )
    lora: LoraConfig | None = Field(
        None,
        description=f"train LoRA adapters instead of every weight (PEFT; tasks {', '.join(LORA_TASKS)}; "
        "for distill on the student, the teacher stays frozen); also written model: {name, lora}",
    )
    output_dir: OutputDir = Field(description="where checkpoints, config.yaml, metrics.json and log.jsonl go")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (model init of new heads, data order, dropout)")
    trust_remote_code: bool = Field(False, description="allow model code from the model's directory or hub repo")
    dtype: Literal["float32", "bfloat16", "float64"] = Field(
        "float32",
        description="model weights dtype; bfloat16 "
        "weights lose AdamW updates below their resolution: for mixed "
        "precision keep float32 and set training.bf16: on",
    )
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="before")
    @classmethod
    def _model_mapping(cls, data: Any) -> Any:
        """``model: {name, lora}`` -> ``model: name`` and ``lora`` (errors keep their ``model.*`` key path)."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        try:
            spec = ModelSpec.model_validate(data["model"])
        except ValidationError as exc:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(type=e["type"], loc=("model", *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
                    for e in exc.errors()
                ],
            ) from None
        if spec.lora is not None and data.get("lora") is not None:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(
                        type="value_error",
                        loc=("model", "lora"),
                        input=data["model"]["lora"],
                        ctx={
                            "error": "LoRA given twice (model.lora and lora); keep one spelling (an override of a "
                            "model: {name, lora} config sets model.lora.KEY)"
                        },
                    )
                ],
            )
        data = {**data, "model": spec.name}
        if spec.lora is not None:
            data["lora"] = spec.lora.model_dump()
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; choose one of: {', '.join(TASKS)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.training.max_steps == 0 or self.training.max_steps < -1:
            raise ValueError("training.max_steps must be -1 (use epochs) or >= 1")
        if self.lora is not None and self.task not in LORA_TASKS:
            raise ValueError(
                f"lora: LoRA adapters are for the causal-LM tasks ({', '.join(LORA_TASKS)}), not {self.task}"
            )
        if self.data.num_proc > 1 and self.task != "causal_lm":
            raise ValueError(
                f"data.num_proc > 1 is for causal_lm (mask building); the {self.task} task tokenises in one process"
            )
        if self.data.packing:
            for i, term in enumerate(self.loss.terms or []):
                per_row = term.get("reduction") == "sequence" or term.get("name") in PER_ROW_TERMS
                if per_row:
                    raise ValueError(
                        f"loss.terms.{i} ({term.get('name')}{', reduction sequence' if term.get('reduction') == 'sequence' else ''}) "
                        "works on whole samples, and data.packing puts several samples in one row; "
                        "set data.packing: false"
                    )
        self._check_early_stopping()
        if self.task == "distill":
            self._check_distill()
        elif self.distill != DistillConfig():
            raise ValueError(
                f"distill: the section is read by task distill only, and this config's task is {self.task}; "
                "set task: distill, or remove the distill section"
            )
        return self

    @property
    def teacher_is_own_base(self) -> bool:
        """Whether the distill teacher is the LoRA student's own base model (``model`` names the
        teacher, no ``distill.student``): the student with its adapters switched off is then the
        teacher, and no second copy is loaded. The distillation term is a divergence from the model
        the run started from: a regulariser that keeps a LoRA fine-tune close to its base."""
        d = self.distill
        return self.lora is not None and d.student is None and d.teacher is not None and self.model == d.teacher

    def _check_distill(self) -> None:
        d = self.distill
        if d.cache and d.top_k is None:
            raise ValueError("distill.cache stores the teacher's top-k logits: set distill.top_k (e.g. 20)")
        if d.lmbda > 0 and d.cache:
            raise ValueError(
                "distill.lmbda > 0 needs the live teacher to score the student's completions: set distill.cache: false"
            )
        if d.lmbda > 0 and self.data.packing:
            raise ValueError("distill.lmbda > 0 (on-policy completions) needs data.packing: false")
        if d.lmbda > 0 and self.training.fsdp:
            raise ValueError("distill.lmbda > 0 needs training.fsdp: false (the student generates unsharded)")
        if self.teacher_is_own_base and not d.cache and self.training.fsdp:
            raise ValueError(
                "the student's own base as the live teacher (model == distill.teacher under lora) needs "
                "training.fsdp: false (its adapters-off forward runs outside the sharded model); or set "
                "distill.top_k and distill.cache: true (the teacher's top-k computed before training)"
            )
        if d.student is not None and "model" in self.model_fields_set and self.model != d.teacher:
            raise ValueError(
                f"model {self.model!r} and distill.student.init_from: teacher both name the student; "
                "leave model out (the student is built from the teacher) or drop distill.student"
            )

    def _check_early_stopping(self) -> None:
        t = self.training
        metric = t.metric_for_best_model.removeprefix("eval_")
        if metric != "loss" and not metric.startswith("loss/"):
            raise ValueError(
                f"training.metric_for_best_model: {t.metric_for_best_model!r} is not measured during training; "
                "use eval_loss or eval_loss/LABEL (a loss term's label)"
            )
        if not t.early_stopping_patience:
            return
        if self.data.validation is None:
            raise ValueError("training.early_stopping_patience needs validation data (data.validation)")
        if t.save_steps and not t.eval_steps:
            raise ValueError(
                "training.early_stopping_patience with training.save_steps needs training.eval_steps "
                "(the best model is kept among evaluated checkpoints): set eval_steps to a divisor of save_steps"
            )
        if t.save_steps and t.eval_steps and t.save_steps % t.eval_steps:
            raise ValueError(
                f"training.early_stopping_patience: training.save_steps ({t.save_steps}) must be a multiple "
                f"of training.eval_steps ({t.eval_steps}), so every kept checkpoint has been evaluated"
            )
