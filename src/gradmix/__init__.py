"""gradmix: adaptive online data mixing for PyTorch.

While a model trains on several data sources, gradmix changes how much of each source goes into every batch,
from cheap gradient signals (PiKE / Fair-PiKE, DGA) or from static rules (uniform, temperature, ...).
"""

from gradmix.methods import available_methods, make_method, register_method, unregister_method
from gradmix.methods.base import MixingMethod, WeightError
from gradmix.stats import DomainStats, StatsError

__version__ = "0.1.0"

__all__ = [
    "DomainStats",
    "Mixer",
    "MixingMethod",
    "MixtureSampler",
    "StatsError",
    "WeightError",
    "__version__",
    "available_methods",
    "make_method",
    "register_method",
    "unregister_method",
]


def __getattr__(name: str):  # lazy: keep `import gradmix` light
    if name == "MixtureSampler":
        from gradmix.sampler import MixtureSampler

        return MixtureSampler
    if name == "Mixer":
        from gradmix.controller import Mixer

        return Mixer
    raise AttributeError(f"module 'gradmix' has no attribute {name!r}")
