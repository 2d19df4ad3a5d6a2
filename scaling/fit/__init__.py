"""Fitting scaling laws: tables, law forms, the fitter, allocation and form comparison.

The functions a notebook, the CLI and the plots call:

- `load_source`, `load_table`: runs from a results folder or a CSV/Parquet table;
- `get_law`, `law_names`, `parse_param_range`: built-in forms and custom formulas;
- `fit` -> `FitResult` (``to_dict``, ``save``, ``load``), `predict`, `predict_arrays`;
- `approach_1`, `approach_2`, `all_approaches`: Hoffmann et al.'s allocation approaches;
- `compare_laws`, `extrapolation_check`, `information_criteria`: which form to trust.
"""

from scaling.fit.allocate import Allocation, allocate, optimal_split
from scaling.fit.approaches import all_approaches, approach_1, approach_2, budget_groups
from scaling.fit.compare import compare_laws, extrapolation_check, information_criteria
from scaling.fit.fitter import FitResult, fit, predict, predict_arrays
from scaling.fit.laws import Law, get_law, law_names, parse_param_range
from scaling.fit.table import load_source, load_table

__all__ = [
    "Allocation",
    "FitResult",
    "Law",
    "all_approaches",
    "allocate",
    "approach_1",
    "approach_2",
    "budget_groups",
    "compare_laws",
    "extrapolation_check",
    "fit",
    "get_law",
    "information_criteria",
    "law_names",
    "load_source",
    "load_table",
    "optimal_split",
    "parse_param_range",
    "predict",
    "predict_arrays",
]
