"""Training: tasks (heads' losses and metrics), metrics, the two-stage trainer, checkpoints and cross-validation.

- ``tasks``: ``ClassificationTask``, ``GradingTask``, ``SurvivalTask`` (loss on logits, predictions, metrics).
- ``losses``: discrete-time survival NLL, quantile time bins, Cox partial likelihood (specs/abmilx.md §2.6).
- ``metrics``: accuracy, balanced accuracy, macro-F1, AUC, QWK, C-index, bootstrap CI.
- ``trainer``: ``TrainConfig``, ``train_two_stage`` -> ``RunResult``; reusable ``build_optimizer``,
  ``cosine_schedule``, ``EMA``, ``evaluate``.
- ``checkpoint``: safetensors + JSON checkpoints with exact resume. ``sampling``: class-balanced oversampling.
- ``cv``: patient-level stratified k-fold, multi-seed runs, ``run_model_grid`` for notebooks.
- ``e2e``: the end-to-end (encoder + MIL) trainer.
"""

from milstudy.train.cv import CVResult, aggregate_runs, cross_validate, run_model_grid
from milstudy.train.tasks import ClassificationTask, GradingTask, SurvivalTask
from milstudy.train.trainer import RunResult, TrainConfig, evaluate, train_two_stage

__all__ = [
    "CVResult", "ClassificationTask", "GradingTask", "RunResult", "SurvivalTask", "TrainConfig",
    "aggregate_runs", "cross_validate", "evaluate", "run_model_grid", "train_two_stage",
]
