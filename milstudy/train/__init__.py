"""Training: the one loop, its steps, tasks (heads' losses and metrics), metrics, checkpoints and cross-validation.

- ``loop``: ``fit(step, config) -> FitResult``, the one training loop (optimizer, schedule, EMA, validation-only
  selection, early stopping, checkpoints + exact resume, DDP stop decisions), the ``TrainingStep`` protocol,
  ``EvalResult``; ``config``: ``LoopConfig`` (the shared fields), ``resolve_device``; ``optim``: ``EMA``,
  ``cosine_schedule``, ``build_optimizer``, ``seed_everything``.
- ``two_stage``: ``TrainConfig``, ``BagStep`` (feature bags), ``train_two_stage``, ``evaluate``, ``attention_of``.
- ``e2e``: ``E2EConfig``, ``E2EStep`` (sampled patches, encoder + aggregator), ``train_e2e``; ``e2e_cli`` its
  command line (also under torchrun).
- ``tasks``: ``ClassificationTask``, ``GradingTask``, ``SurvivalTask``, ``build_task`` (loss, predictions, metrics).
- ``losses``: discrete-time survival NLL, quantile time bins, Cox partial likelihood (specs/abmilx.md §2.6).
- ``metrics``: accuracy, balanced accuracy, macro-F1, AUC, QWK, C-index, bootstrap CI.
- ``checkpoint``: safetensors + JSON checkpoints with exact resume. ``oversampling``: class-balanced oversampling.
- ``cv``: patient-level stratified k-fold, multi-seed runs, ``run_model_grid`` for notebooks.
- ``distributed``: DDP set-up from torchrun's environment (NCCL on CUDA, gloo on CPU).
"""

from milstudy.train.cv import CVResult, aggregate_runs, cross_validate, run_model_grid
from milstudy.train.tasks import ClassificationTask, GradingTask, SurvivalTask
from milstudy.train.loop import EvalResult, FitResult, LoopConfig, fit
from milstudy.train.two_stage import BagStep, TrainConfig, evaluate, train_two_stage

__all__ = [
    "BagStep", "CVResult", "ClassificationTask", "EvalResult", "FitResult", "GradingTask", "LoopConfig", "SurvivalTask",
    "TrainConfig", "aggregate_runs", "cross_validate", "evaluate", "fit", "run_model_grid", "train_two_stage",
]
