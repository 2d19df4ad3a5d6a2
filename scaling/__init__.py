"""scaling: plan sweeps, train small GPT and MoE models, fit scaling laws and use them.

The public API, stage by stage (each a plain function a notebook can call)::

    spec = load_sweep("sweeps/quickstart.yaml")     # validated SweepSpec
    runs = plan_sweep(spec)                         # resolved runs: shape, N, D, C
    run_sweep(spec, "results")                      # train what is missing, store Parquet
    frame = load_runs("results/quickstart")         # one row per run (pandas)
    result = fit(frame, "chinchilla", bootstrap=200)  # from scaling.fit import fit
    predict(result, compute=1e13)                   # compute-optimal N, D and loss

Names are imported on first use, so ``import scaling`` stays light. ``fit`` lives in the
subpackage of that name: ``from scaling.fit import fit``.
"""

from importlib import import_module

from scaling.errors import DataError, FitError, LaunchError, ResultsError, ScalingError, SpecError

__version__ = "0.1.0"

_LAZY = {
    "load_sweep": "scaling.spec",
    "parse_sweep": "scaling.spec",
    "SweepSpec": "scaling.spec",
    "RunSpec": "scaling.spec",
    "plan_sweep": "scaling.plan",
    "run_sweep": "scaling.launch",
    "train_run": "scaling.train",
    "load_runs": "scaling.results",
    "load_curves": "scaling.results",
    "count": "scaling.model.count",
    "ModelShape": "scaling.model.count",
    "predict": "scaling.fit.fitter",
    "FitResult": "scaling.fit.fitter",
    "load_table": "scaling.fit.table",
    "plot_all": "scaling.plots",
    "write_report": "scaling.report",
}

__all__ = [
    "DataError",
    "FitError",
    "LaunchError",
    "ResultsError",
    "ScalingError",
    "SpecError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scaling' has no attribute {name!r}")
