"""Per-domain gradient statistics from the training step itself.

One package, one role: every backward goes through the caller's ``backward_fn``; no K dense gradient copies; what
must be global is reduced as scalars. ``Probe`` is the interface the rest of the library uses; three probes
implement it, and ``make_probe`` (the only place that knows all three) picks one for a model:

- ``GradientProbe`` (``micro``): per-group micro-batches of the training step; works for any model.
- ``FusedGradientProbe`` (``fused``): one forward + one backward, per-layer per-example products from module hooks
  (``coverage``: which parameters the hooks cover, the behaviour test of norm look-alikes, the coverage report;
  ``products``: the per-layer products; ``attention``: MultiheadAttention's recomputed factors); the default.
- ``ShardedGradientProbe`` (``sharded``): FSDP2 models, statistics from local gradient shards.

Shared pieces, written once: ``checks`` (input checks), ``scaling`` (loss divisor, backward-scale anchor),
``layout`` (parameter selection and flat layout), ``parts`` (per-group parts of a batch), ``estimators`` (the
estimators as pure functions), ``target`` (DGA's target gradient, Adam preconditioning) and ``reduce`` (what is
reduced across ranks). A fallback or a skipped parameter is always said, never silent.
"""

from gradmix.probe.coverage import fused_coverage
from gradmix.probe.factory import make_probe
from gradmix.probe.fused import FusedGradientProbe
from gradmix.probe.layout import ParameterSpec, select_parameters
from gradmix.probe.micro import GradientProbe
from gradmix.probe.parts import split_indices
from gradmix.probe.protocol import BackwardFn, LossFn, Probe, ProbeResult
from gradmix.probe.reduce import average_gradients
from gradmix.probe.sharded import ShardedGradientProbe

__all__ = [
    "BackwardFn",
    "FusedGradientProbe",
    "GradientProbe",
    "LossFn",
    "ParameterSpec",
    "Probe",
    "ProbeResult",
    "ShardedGradientProbe",
    "average_gradients",
    "fused_coverage",
    "make_probe",
    "select_parameters",
    "split_indices",
]
