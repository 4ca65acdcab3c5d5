"""One training run end to end (:func:`train`): plan the loss, build the task, train on the
Trainer, evaluate, write the outputs. The command is :mod:`losslab.train.command`.

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``checkpoint-*`` (safetensors, for
resume), ``model/`` (final weights, safetensors; under LoRA the adapter: ``adapter_model.safetensors``
and ``adapter_config.json``), ``model_merged/`` (LoRA with ``merge: true``: base and adapters
merged into one plain model), ``log.jsonl`` (every loss term per step),
``metrics.json`` (final evaluation; written last, so its presence means the run finished).
Rerunning the same command resumes from the last complete checkpoint (see
:mod:`losslab.train.guard`: incomplete checkpoints, non-finite steps, SIGINT and SIGTERM).
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from losslab.errors import UserError
from losslab.eval.report import write_metrics_json
from losslab.files import write_atomic
from losslab.losses.composite import CompositeLoss
from losslab.train.adapter import LossAdapter
from losslab.train.config import TrainConfig
from losslab.train.task import LossPlan, TaskRun, get_task, plan_loss

if TYPE_CHECKING:
    from losslab.train.hooks import EvaluationHook


def training_arguments(config: TrainConfig, *, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    t = config.training
    bf16 = t.bf16 == "on" or (t.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    save_strategy = "steps" if (t.save_steps or t.eval_steps) else "epoch"
    return TrainingArguments(
        output_dir=config.output_dir,
        seed=config.seed,
        data_seed=config.seed,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        optim="adamw_torch",
        lr_scheduler_type="constant_with_warmup" if t.scheduler == "constant" and t.warmup else t.scheduler,
        warmup_steps=t.warmup,
        max_grad_norm=t.max_grad_norm,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=t.save_steps or t.eval_steps or 500,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=bool(t.early_stopping_patience and has_eval),
        metric_for_best_model=t.metric_for_best_model if has_eval else None,
        greater_is_better=t.greater_is_better if has_eval else None,
        logging_steps=t.logging_steps,
        bf16=bf16,
        report_to=list(t.report_to),
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        fsdp=True if t.fsdp else None,  # type: ignore[arg-type]  # (typed str; True turns FSDP on, as its help says)
        fsdp_config=dict(t.fsdp_config or {}) if t.fsdp else None,
        prediction_loss_only=True,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        save_only_model=False,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience count survives a resume
    )


def train(
    config: TrainConfig, *, plan: LossPlan | None = None, on_evaluate: EvaluationHook | None = None
) -> dict[str, float]:
    """Run one training config end to end; returns the final metrics.

    ``on_evaluate(step, validation_metrics)``: called after each evaluation during training
    (see :mod:`losslab.train.hooks`); it may raise to stop the run (Optuna pruning)."""
    from transformers import EarlyStoppingCallback, set_seed

    from losslab.train.checkpoints import keep_log_rows, last_complete_checkpoint, remove_incomplete_checkpoints
    from losslab.train.hooks import EvaluationHookCallback
    from losslab.train.lora import (
        MERGED_DIR,
        check_lora,
        enable_gradient_checkpointing,
        save_merged,
        trainable_summary,
    )
    from losslab.train.signals import Interrupted, stop_on_signals
    from losslab.train.trainer import JsonlLogCallback, LosslabTrainer, LossTermsCallback, WholeRunTrainLossCallback

    plan = plan or plan_loss(config)  # before any model or data is loaded
    check_lora(config)  # lora.target_modules against the model's layers, before any data or weight is read
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    set_seed(config.seed)
    run: TaskRun = get_task(config.task).build(config, plan)
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(run.model)
    if config.lora is not None:
        run.summary["lora"] = {**config.lora.model_dump(mode="json"), "trainable": trainable_summary(run.model)}
    print(f"loss: {plan.note}")
    run.summary["loss"] = plan.note
    has_eval = run.validation is not None and len(run.validation) > 0
    args = training_arguments(config, has_eval=has_eval)
    loss_func = loss_adapter(run, plan, total_steps(config, len(run.train)))
    if has_eval:  # (without evaluation the metric is not used)
        check_best_model_metric(config, loss_func.composite)
    if config.dtype == "bfloat16" and args.process_index == 0:
        print(
            "note: dtype bfloat16 trains bfloat16 weights, which drop AdamW updates below their resolution "
            "(~0.4 % of a weight); for mixed precision keep dtype: float32 and set training.bf16: on"
        )
    callbacks = [LossTermsCallback(loss_func), WholeRunTrainLossCallback(), JsonlLogCallback(out / "log.jsonl")]
    if config.training.early_stopping_patience and has_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.training.early_stopping_patience))
    if on_evaluate is not None and has_eval:
        callbacks.append(
            EvaluationHookCallback(
                on_evaluate, lambda: run.evaluate(trained_model(trainer), run.validation or [], "validation")
            )
        )
    trainer = LosslabTrainer(
        model=run.model,
        args=args,
        train_dataset=run.train,
        eval_dataset=run.validation if has_eval else None,
        data_collator=run.collator,
        processing_class=run.tokenizer,
        loss_func=loss_func,
        callbacks=callbacks,
        max_nonfinite_steps=config.training.max_nonfinite_steps,
    )
    last = last_complete_checkpoint(out)  # a checkpoint whose save was killed is ignored, then deleted
    if trainer.is_world_process_zero():
        for path in remove_incomplete_checkpoints(out):
            print(f"removed incomplete checkpoint {path}")
        keep_log_rows(out / "log.jsonl", last)
        write_summary(out, run.summary)
    if last:
        print(f"resuming from {last}")
    with stop_on_signals(trainer):
        trainer.train(resume_from_checkpoint=last)
        trainer.stop_if_requested_late()
    if trainer.stopping:
        raise Interrupted(
            f"stopped after step {trainer.state.global_step}, checkpoint saved in {last_complete_checkpoint(out)}",
            signum=trainer.stop_signal or signal.SIGINT,
        )
    trainer.save_model_atomic(out / "model")
    metrics: dict[str, float] = {
        "train/steps": float(trainer.state.global_step),
        "train/nonfinite_steps": float(len(trainer.nonfinite_steps)),
    }
    for split in config.eval.splits:
        dataset = run.validation if split == "validation" else run.test
        if dataset is not None and len(dataset):
            metrics.update(run.evaluate(trained_model(trainer), dataset, split))
    if config.lora is not None and config.lora.merge and trainer.is_world_process_zero():
        print(f"merged model (base + adapters): {save_merged(trained_model(trainer), run.tokenizer, out / MERGED_DIR)}")
    if trainer.is_world_process_zero():
        write_summary(
            out,
            {**run.summary, "steps": trainer.state.global_step, "nonfinite_steps": list(trainer.nonfinite_steps)},
            quiet=True,
        )
        write_metrics_json(metrics, out / "metrics.json")
    return metrics


def trained_model(trainer: Any) -> torch.nn.Module:
    """The Trainer's model (the best one after ``load_best_model_at_end``)."""
    model = trainer.model
    assert model is not None  # (set in the Trainer's constructor)
    return model


def loss_adapter(run: TaskRun, plan: LossPlan, total_steps: int = 1) -> LossAdapter:
    """The run's loss: the plan's composite (built here, once) over the task's forward."""
    return LossAdapter(plan.build(total_steps), run.forward, model=run.model, shifts_labels=run.shifts_labels)


def check_best_model_metric(config: TrainConfig, composite: CompositeLoss) -> None:
    """``training.metric_for_best_model`` names the loss or one of the run's loss terms."""
    metric = config.training.metric_for_best_model.removeprefix("eval_")
    labels = [t.label for t in composite.terms]
    if metric != "loss" and metric.removeprefix("loss/") not in labels:
        raise UserError(
            f"training.metric_for_best_model: {config.training.metric_for_best_model!r} is not measured; "
            f"use eval_loss or one of {', '.join(f'eval_loss/{label}' for label in labels)}"
        )


def write_summary(out: Path, summary: dict[str, Any], *, quiet: bool = False) -> Path:
    """Write the run summary (the task's data lines, and per split the bad records skipped
    and the samples dropped, each ``file:line: reason``) to ``out/summary.json`` atomically;
    print where it is and how many records were skipped."""
    path = out / "summary.json"
    write_atomic(path, json.dumps(summary, indent=2, default=str) + "\n")
    if not quiet:
        counts = {split: v["count"] for split, v in summary.get("skipped", {}).items() if v["count"]}
        skipped = ", ".join(f"{split} {n}" for split, n in counts.items())
        print(f"run summary: {path}" + (f" (bad records skipped: {skipped}; listed there)" if skipped else ""))
    return path


def total_steps(config: TrainConfig, n_train: int) -> int:
    t = config.training
    if t.max_steps > 0:
        return t.max_steps
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    per_step = t.batch_size * t.grad_accum * world
    return max(1, math.ceil(math.ceil(n_train / per_step) * t.epochs))
