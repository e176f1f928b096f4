"""milstudy: a reproducible study of slide-level multiple-instance learning in computational pathology.

Layers (data flows one way): ``milstudy.data`` (slides, tiling, cohorts, manifests, bags) ->
``milstudy.encoders`` -> ``milstudy.models`` (aggregators behind one registry) -> ``milstudy.train``
(tasks, metrics, two-stage and end-to-end trainers) -> ``milstudy.analysis`` / ``milstudy.plots`` ->
``milstudy.runner`` (papermill batches, provenance, results index).
"""

__version__ = "0.1.0"
