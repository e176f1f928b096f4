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

# Names resolve on first use (PEP 562): ``milstudy`` builds its parser by importing every command module, and the
# two-stage command lives in this package, so importing the package must not import torch for ``milstudy list``.
_EXPORTS = {
    "CVResult": "cv", "aggregate_runs": "cv", "cross_validate": "cv", "run_model_grid": "cv",
    "ClassificationTask": "tasks", "GradingTask": "tasks", "SurvivalTask": "tasks",
    "EvalResult": "loop", "FitResult": "loop", "LoopConfig": "loop", "fit": "loop",
    "BagStep": "two_stage", "TrainConfig": "two_stage", "evaluate": "two_stage", "train_two_stage": "two_stage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'milstudy.train' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"milstudy.train.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
