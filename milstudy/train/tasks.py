"""Slide-level tasks: what a model's logits mean, how they are trained and how they are scored (DESIGN.md "Task").

A task owns the head size (``n_out``), the loss on logits, the conversion of logits to per-slide predictions and
the metrics; the model zoo stays task-agnostic (every model ends in ``Linear(..., n_out)``).

- ``ClassificationTask(classes)``: cross-entropy (optional class weights); metrics accuracy (micro), balanced
  accuracy, macro-F1 and AUC (binary: positive class; multi-class: macro one-vs-rest). Primary metric: ``auc``.
- ``GradingTask(n_grades)``: ordinal grades trained with cross-entropy (specs/abmilx.md §2.6); adds quadratic
  weighted kappa. Primary metric: ``accuracy`` (top-1 micro, §3 pitfall 5), QWK reported beside it.
- ``SurvivalTask(bin_edges=None, n_bins=4, loss="nll" | "cox")``: targets ``(time, event)``; discrete-time NLL on
  quantile bins of the uncensored times (computed from the training targets unless given), or Cox partial
  likelihood (one output, needs batches of several slides). Risk = ``-Σ S_k`` (NLL) or the log-risk (Cox).
  Primary metric: ``c_index``.

Common interface (used by ``trainer.py``, ``cv.py`` and the end-to-end trainer):
``n_out``; ``prepare(raw_train_targets) -> task`` (a fitted copy: survival bins, balanced class weights, label
checks); ``make_targets(raw_targets, slide_ids) -> Tensor``; ``loss(logits, targets)``; ``predict(logits) -> dict
of per-slide numpy arrays``; ``target_columns(targets) -> dict``; ``metrics(predictions, targets) -> dict``;
``frame_metric(df, name)`` on a predictions DataFrame (for pooled bootstrap CIs); ``primary_metric``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from milstudy.train import metrics as M
from milstudy.train.losses import assign_bins, cox_partial_nll, risk_from_hazards, survival_bins, survival_nll


def _ids(slide_ids: Sequence[str] | None, n: int) -> list[str]:
    return list(slide_ids) if slide_ids is not None else [f"#{i}" for i in range(n)]


class Task:
    """Base class; see the module docstring for the interface."""

    name: str = "task"
    primary_metric: str = ""
    n_out: int = 0

    def prepare(self, raw_train_targets: Sequence[Any], slide_ids: Sequence[str] | None = None) -> "Task":
        """A copy fitted to the training targets (labels are validated on the way)."""
        self.make_targets(raw_train_targets, slide_ids)
        return copy.copy(self)

    def metric_mode(self, name: str) -> str:
        """``"min"`` for losses, ``"max"`` for every other metric."""
        return "min" if "loss" in name else "max"

    def frame_metric(self, frame: pd.DataFrame, name: str) -> float:
        """Metric ``name`` on a predictions DataFrame (``RunResult.predictions`` rows); raises if undefined."""
        raise NotImplementedError

    def stratify_labels(self, raw_targets: Sequence[Any]) -> np.ndarray:
        """Integer labels for stratified splits."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------- classification
def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _is_int_like(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _lookup_class(classes: Sequence[Any], index: Mapping[Any, int], key: Any) -> int | None:
    """Index of ``key`` among ``classes`` (by value, then by an unambiguous spelling or index); None if none."""
    if _is_blank(key):
        return None
    try:
        if key in index:
            return index[key]
    except TypeError:  # unhashable
        return None
    spelled = [i for i, c in enumerate(classes) if str(c) == str(key)]
    if len(spelled) == 1:
        return spelled[0]
    if _is_int_like(key) and not any(_is_int_like(c) for c in classes) and 0 <= int(key) < len(classes):
        return int(key)
    return None


@dataclass
class ClassificationTask(Task):
    """Single-label classification with cross-entropy.

    classes: the label values in head order (strings or ints), or an int ``C`` meaning labels ``0..C-1``.
    class_weights: ``None``, ``"balanced"`` (inverse class frequency of the training targets, set by ``prepare``)
        or one weight per class.
    """

    classes: Sequence[Any] | int = 2
    class_weights: str | Sequence[float] | None = None
    name: str = field(default="classification", init=False)
    primary_metric: str = field(default="auc", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.classes, (int, np.integer)):
            self.classes = list(range(int(self.classes)))
        self.classes = list(self.classes)
        if len(self.classes) < 2:
            raise ValueError(f"{type(self).__name__}: need at least 2 classes, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{type(self).__name__}: duplicate classes in {self.classes}")
        self._index = {self._key(c): i for i, c in enumerate(self.classes)}
        if self.class_weights is not None and not isinstance(self.class_weights, str):
            if len(self.class_weights) != len(self.classes):
                raise ValueError(
                    f"class_weights has {len(self.class_weights)} values for {len(self.classes)} classes"
                )

    @staticmethod
    def _key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return value

    @property
    def n_out(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def class_index(self, raw: Any, slide_id: str = "?") -> int:
        """Head index of a raw label: a class value (``"IDC"``, ``1``) or, where unambiguous, an index.

        An integer is read as an index into ``classes`` only when no class is itself an integer (a dataset such
        as ``BagDataset`` has already turned ``"IDC"``/``"ILC"`` into 0/1); a string ``"1"`` matches the class
        ``1`` only when no other class spells the same. Anything else raises naming the slide and the value.
        """
        index = _lookup_class(self.classes, self._index, self._key(raw))
        if index is None:
            raise ValueError(
                f"slide {slide_id}: label {raw!r} is not one of the task's classes {self.classes}; "
                "fix the manifest label or pass classes=[...] that include it"
            )
        return index

    def make_targets(self, raw_targets: Sequence[Any], slide_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Class indices ``int64[B]`` from raw bag targets (class values from ``classes``)."""
        ids = _ids(slide_ids, len(raw_targets))
        return torch.tensor([self.class_index(t, s) for t, s in zip(raw_targets, ids)], dtype=torch.long)

    def prepare(self, raw_train_targets: Sequence[Any], slide_ids: Sequence[str] | None = None) -> "Task":
        targets = self.make_targets(raw_train_targets, slide_ids).numpy()
        fitted = copy.copy(self)
        if self.class_weights == "balanced":
            counts = np.bincount(targets, minlength=self.n_out).astype(np.float64)
            weights = np.where(counts > 0, len(targets) / (self.n_out * np.maximum(counts, 1)), 0.0)
            fitted.class_weights = weights.tolist()
        elif isinstance(self.class_weights, str):
            raise ValueError(f"class_weights must be None, 'balanced' or a list, got {self.class_weights!r}")
        return fitted

    def stratify_labels(self, raw_targets: Sequence[Any]) -> np.ndarray:
        return self.make_targets(raw_targets).numpy()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits [B, C]`` against ``targets int64[B]``, in fp32."""
        weight = None
        if self.class_weights is not None:
            if isinstance(self.class_weights, str):
                raise RuntimeError("class_weights='balanced' needs task.prepare(train_targets) first")
            weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return F.cross_entropy(logits.float(), targets.to(logits.device), weight=weight)

    def predict(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"probabilities": [B, C], "prediction": [B]}`` (softmax and argmax)."""
        probabilities = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
        return {"probabilities": probabilities, "prediction": probabilities.argmax(axis=1)}

    def target_columns(self, targets: torch.Tensor) -> dict[str, np.ndarray]:
        return {"target": targets.cpu().numpy()}

    def prediction_columns(self, predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns = {f"prob_{k}": predictions["probabilities"][:, k] for k in range(self.n_out)}
        columns["prediction"] = predictions["prediction"]
        return columns

    def metrics(self, predictions: Mapping[str, np.ndarray], targets: np.ndarray | torch.Tensor) -> dict[str, float]:
        """accuracy, balanced_accuracy, f1_macro, auc (NaN where undefined on these slides)."""
        y = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
        pred, prob = predictions["prediction"], predictions["probabilities"]
        return {
            "accuracy": M.accuracy(y, pred),
            "balanced_accuracy": M.balanced_accuracy(y, pred),
            "f1_macro": M.f1(y, pred, "macro"),
            "auc": M.safe_metric(M.roc_auc, y, prob),
        }

    def frame_metric(self, frame: pd.DataFrame, name: str) -> float:
        y = frame["target"].to_numpy()
        prob = frame[[f"prob_{k}" for k in range(self.n_out)]].to_numpy()
        prediction = prob.argmax(axis=1)
        single = {
            "accuracy": lambda: M.accuracy(y, prediction),
            "balanced_accuracy": lambda: M.balanced_accuracy(y, prediction),
            "f1_macro": lambda: M.f1(y, prediction, "macro"),
            "f1_micro": lambda: M.f1(y, prediction, "micro"),
            "auc": lambda: M.roc_auc(y, prob),
            "qwk": lambda: M.quadratic_kappa(y, prediction),
        }
        if name not in single:
            raise KeyError(f"unknown metric {name!r} for {self.name}; known: {sorted(single)}")
        return single[name]()


@dataclass
class GradingTask(ClassificationTask):
    """Ordinal grading (e.g. PANDA ISUP 0-5) trained with cross-entropy; reports QWK beside accuracy.

    n_grades: number of grades (labels ``0..n_grades-1``) unless ``classes`` is given.
    """

    n_grades: int | None = None
    name: str = field(default="grading", init=False)
    primary_metric: str = field(default="accuracy", init=False)

    def __post_init__(self) -> None:
        if self.n_grades is not None:
            self.classes = list(range(int(self.n_grades)))
        super().__post_init__()

    def metrics(self, predictions: Mapping[str, np.ndarray], targets: np.ndarray | torch.Tensor) -> dict[str, float]:
        """accuracy, balanced_accuracy, f1_macro, auc and qwk."""
        values = super().metrics(predictions, targets)
        y = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
        values["qwk"] = M.safe_metric(M.quadratic_kappa, y, predictions["prediction"])
        return values


# --------------------------------------------------------------------------------------------------------- survival
def _time_event(raw: Any, slide_id: str) -> tuple[float, float]:
    if isinstance(raw, Mapping):
        time = raw.get("time", raw.get("survival_months"))
        event = raw.get("event")
    elif isinstance(raw, (tuple, list, np.ndarray, torch.Tensor)) and len(raw) == 2:
        time, event = (float(v) for v in raw)
    else:
        time = event = None
    if time is None or event is None:
        raise ValueError(
            f"slide {slide_id}: survival target {raw!r} is not (time, event) or a dict with "
            "'time'/'survival_months' and 'event'"
        )
    time, event = float(time), float(event)
    if not np.isfinite(time) or time < 0:
        raise ValueError(f"slide {slide_id}: survival time {time} must be finite and >= 0")
    if event not in (0.0, 1.0):
        raise ValueError(f"slide {slide_id}: event {event} must be 0 (censored) or 1 (event)")
    return time, event


class SurvivalTask(Task):
    """Survival from (time, event) targets.

    bin_edges: fixed bin edges (``n_bins + 1`` values), e.g. ``survival_bins`` over the whole cohort (upstream
        convention); ``None`` = computed by ``prepare`` from the training targets (train-only edges).
    n_bins: number of discrete-time bins when edges are computed.
    loss: ``"nll"`` (discrete-time, ``n_out = n_bins``) or ``"cox"`` (partial likelihood, ``n_out = 1``; batches of
        several slides, ``TrainConfig.batch_size > 1``). Stored as ``loss_name`` (``loss`` is the loss method).
    """

    name = "survival"
    primary_metric = "c_index"

    def __init__(self, bin_edges: Sequence[float] | None = None, n_bins: int = 4, loss: str = "nll") -> None:
        if loss not in ("nll", "cox"):
            raise ValueError(f"SurvivalTask: loss must be 'nll' or 'cox', got {loss!r}")
        self.loss_name = loss
        self.n_bins = int(n_bins)
        self.bin_edges: np.ndarray | None = None
        if bin_edges is not None:
            edges = np.asarray(bin_edges, dtype=np.float64)
            if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) < 0):
                raise ValueError(f"SurvivalTask: bin_edges must be increasing with >= 2 values, got {edges}")
            self.bin_edges = edges
            self.n_bins = len(edges) - 1

    def __repr__(self) -> str:
        return f"SurvivalTask(n_bins={self.n_bins}, loss={self.loss_name!r}, bin_edges={self.bin_edges})"

    @property
    def n_out(self) -> int:  # type: ignore[override]
        return 1 if self.loss_name == "cox" else self.n_bins

    @property
    def needs_batches(self) -> bool:
        """The Cox loss compares slides within a batch, so it needs ``batch_size > 1``."""
        return self.loss_name == "cox"

    def make_targets(self, raw_targets: Sequence[Any], slide_ids: Sequence[str] | None = None) -> torch.Tensor:
        """``float32[B, 2]`` columns (time, event)."""
        ids = _ids(slide_ids, len(raw_targets))
        return torch.tensor([_time_event(t, s) for t, s in zip(raw_targets, ids)], dtype=torch.float32).view(-1, 2)

    def prepare(self, raw_train_targets: Sequence[Any], slide_ids: Sequence[str] | None = None) -> "Task":
        targets = self.make_targets(raw_train_targets, slide_ids).numpy()
        fitted = copy.copy(self)
        if self.loss_name == "nll" and self.bin_edges is None:
            fitted.bin_edges = survival_bins(targets[:, 0], targets[:, 1], self.n_bins)
        return fitted

    @classmethod
    def from_cohort(cls, raw_targets: Sequence[Any], n_bins: int = 4, loss: str = "nll") -> "SurvivalTask":
        """Task with edges over the whole cohort (the upstream ABMILX convention, specs/abmilx.md §2.6)."""
        targets = cls(n_bins=n_bins).make_targets(raw_targets).numpy()
        return cls(bin_edges=survival_bins(targets[:, 0], targets[:, 1], n_bins), loss=loss)

    def stratify_labels(self, raw_targets: Sequence[Any]) -> np.ndarray:
        return self.make_targets(raw_targets).numpy()[:, 1].astype(np.int64)

    def bins(self, times: np.ndarray | torch.Tensor) -> np.ndarray:
        if self.bin_edges is None:
            raise RuntimeError("SurvivalTask has no bin edges: call task.prepare(train_targets) or pass bin_edges")
        times = times.cpu().numpy() if isinstance(times, torch.Tensor) else times
        return assign_bins(times, self.bin_edges)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.device)
        if self.loss_name == "cox":
            return cox_partial_nll(logits[:, 0], targets[:, 0], targets[:, 1])
        bins = torch.as_tensor(self.bins(targets[:, 0]), device=logits.device)
        return survival_nll(logits, bins, targets[:, 1])

    def predict(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"risk": [B]}`` plus ``"survival": [B, K]`` for the NLL head."""
        logits = logits.detach().float()
        if self.loss_name == "cox":
            return {"risk": logits[:, 0].cpu().numpy()}
        survival = torch.cumprod(1.0 - torch.sigmoid(logits), dim=1)
        return {"risk": risk_from_hazards(logits).cpu().numpy(), "survival": survival.cpu().numpy()}

    def target_columns(self, targets: torch.Tensor) -> dict[str, np.ndarray]:
        t = targets.cpu().numpy()
        columns = {"time": t[:, 0], "event": t[:, 1].astype(np.int64)}
        if self.bin_edges is not None:
            columns["bin"] = self.bins(t[:, 0])
        return columns

    def prediction_columns(self, predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"risk": predictions["risk"]}

    def metrics(self, predictions: Mapping[str, np.ndarray], targets: np.ndarray | torch.Tensor) -> dict[str, float]:
        """``{"c_index": ...}`` (NaN without a comparable pair)."""
        t = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
        return {"c_index": M.safe_metric(M.c_index, t[:, 0], t[:, 1], predictions["risk"])}

    def frame_metric(self, frame: pd.DataFrame, name: str) -> float:
        if name != "c_index":
            raise KeyError(f"unknown metric {name!r} for survival; known: ['c_index']")
        return M.c_index(frame["time"].to_numpy(), frame["event"].to_numpy(), frame["risk"].to_numpy())


# ------------------------------------------------------------------------------------------------ from a config
class LabelError(ValueError):
    """A label is outside the task's classes (or missing); the message names the file, line or slide and value."""


def _where(source: Any, i: int) -> str:
    """Where target ``i`` came from, for messages (see :func:`build_task`)."""
    if source is None:
        return f"target #{i}"
    if isinstance(source, (str, os.PathLike)):
        return f"{source}, target #{i}"
    try:
        return str(source[i])
    except (IndexError, KeyError, TypeError):
        return f"target #{i}"


def _raw_value(target: Any) -> Any:
    if isinstance(target, torch.Tensor) and target.numel() == 1:
        target = target.item()
    if isinstance(target, np.generic):
        target = target.item()
    if isinstance(target, float) and float(target).is_integer():
        target = int(target)
    return target


def infer_classes(targets: Sequence[Any], source: Any = None, what: str = "classes", min_classes: int = 2) -> list[int]:
    """Classes of undeclared labels: only integer labels forming exactly ``0..C-1`` (C >= ``min_classes``).

    Anything else (a gap such as {0, 1, 4}, strings, a blank) raises ``LabelError`` naming the first suspicious
    label's location and asking for the classes to be declared, so that a typo never adds a class silently.
    """
    values = [_raw_value(t) for t in targets]
    for i, value in enumerate(values):
        if _is_blank(value):
            raise LabelError(f"{_where(source, i)}: label is blank; fill it in or drop the slide")
    if not values:
        raise LabelError(f"{source or 'targets'}: no labels to infer the {what} from; declare them")
    if not all(_is_int_like(v) for v in values):
        first = next(i for i, v in enumerate(values) if not _is_int_like(v))
        found = sorted({str(v) for v in values})
        raise LabelError(
            f"{_where(source, first)}: label {values[first]!r} is not an integer class index and no {what} were "
            f"declared (labels found: {found[:12]}); declare them, e.g. task: {{classes: {found[:4]}}} in the run "
            "file or classes=[...], so that a misspelt label is refused instead of becoming a new class")
    present = sorted(set(values))
    expected = list(range(len(present)))
    if present != expected or len(present) < min_classes:
        odd = next((v for v in present if v < 0 or v >= max(len(present), min_classes)), present[-1])
        first = values.index(odd)
        raise LabelError(
            f"{_where(source, first)}: label {odd} makes the labels {present} that are not 0..C-1 "
            f"(C >= {min_classes}) and no "
            f"{what} were declared; declare them (task: {{classes: [...]}} or n_grades) or fix the label")
    return expected


def check_labels(task: "ClassificationTask", targets: Sequence[Any], source: Any = None) -> None:
    """Raise ``LabelError`` (file/line or slide, value, the classes) for the first target outside ``task.classes``."""
    for i, target in enumerate(targets):
        value = _raw_value(target)
        if _is_blank(value):
            raise LabelError(f"{_where(source, i)}: label is blank; the task's classes are {task.classes}")
        if _lookup_class(task.classes, task._index, task._key(value)) is None:
            raise LabelError(
                f"{_where(source, i)}: label {value!r} is not one of the task's classes {task.classes}; fix the "
                "label or declare the classes that include it")


def build_task(spec: Mapping[str, Any] | None, targets: Sequence[Any], source: Any = None) -> Task:
    """A task from a config mapping ``{type: classification|grading|survival, classes: [...], n_grades: 6,
    n_bins: 4, ...}``, with every target checked against it before anything trains.

    Classes come from the spec (``classes``, or ``n_grades`` for grading); without them only integer labels that
    form exactly ``0..C-1`` are accepted (:func:`infer_classes`), so a typo or blank label is an error instead of
    a 3-class head. ``source`` says where target ``i`` came from, for the messages: a sequence / mapping of
    location strings (e.g. ``"cohort.csv line 7 (slide s5)"``), a file name, or None. Raises ``LabelError``.

    Survival bin edges: from the training split (``prepare``, the default of every training path), or with
    ``bin_edges_from: cohort`` over all of ``targets`` (the whole cohort: the upstream ABMILX convention).
    """
    spec = dict(spec or {})
    kind = spec.pop("type", "classification")
    edges_from = spec.pop("bin_edges_from", "train")
    if edges_from not in ("train", "cohort"):
        raise ValueError(f"task.bin_edges_from must be 'train' or 'cohort', got {edges_from!r}")
    if edges_from == "cohort" and kind != "survival":
        raise ValueError("task.bin_edges_from applies to survival tasks only")
    if kind in ("classification", "grading"):
        cls = ClassificationTask if kind == "classification" else GradingTask
        declared = spec.get("classes")
        if declared is None and not (kind == "grading" and spec.get("n_grades") is not None):
            spec["classes"] = infer_classes(targets, source, "grades" if kind == "grading" else "classes")
        try:
            task = cls(**spec)
        except TypeError as err:
            raise ValueError(f"task: {err}") from None
        check_labels(task, targets, source)
        return task
    if kind == "survival":
        task = SurvivalTask(**spec)
        for i, target in enumerate(targets):
            try:
                _time_event(target, _where(source, i))
            except ValueError as err:
                raise LabelError(str(err).removeprefix("slide ")) from None
        return SurvivalTask.from_cohort(targets, **spec) if edges_from == "cohort" else task
    raise ValueError(f"task type must be classification, grading or survival, got {kind!r}")
