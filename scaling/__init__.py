"""scaling: plan sweeps, train small GPT and MoE models, fit scaling laws and use them."""

from scaling.errors import DataError, FitError, LaunchError, ResultsError, ScalingError, SpecError

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "FitError",
    "LaunchError",
    "ResultsError",
    "ScalingError",
    "SpecError",
    "__version__",
]
