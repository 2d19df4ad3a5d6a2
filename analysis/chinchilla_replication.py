"""Refit Hoffmann et al.'s Chinchilla points and set the result beside the published fits.

Data: ``../shared/data/external/chinchilla_svg_extracted.csv`` (Figure 4 of Hoffmann et al.
2022, read off by Besiroglu et al. 2024); the five highest-loss points are dropped, as in
the replication. Usage::

    python analysis/chinchilla_replication.py [CSV] [--bootstrap B]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from scaling.fit import fit, load_table

DEFAULT_CSV = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "external"
    / ("chinchilla_svg_extracted.csv")
)

# Besiroglu et al. 2024, table 1 ("grid fit" row of ../shared/data/README.md), and Hoffmann
# et al. 2022, equation 10 (rounded as published).
PUBLISHED = {
    "replication (Besiroglu et al. 2024)": {
        "E": 1.817,
        "A": 478,
        "B": 2143,
        "alpha": 0.347,
        "beta": 0.367,
    },
    "Chinchilla paper (Hoffmann et al. 2022)": {
        "E": 1.69,
        "A": 406.4,
        "B": 410.7,
        "alpha": 0.34,
        "beta": 0.28,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()

    table = load_table(
        args.csv, {"params": "Model Size", "compute": "Training FLOP", "loss": "loss"}
    )
    table = table.drop(table["loss"].nlargest(5).index)
    result = fit(table, "chinchilla", bootstrap=args.bootstrap, seed=0)

    rows = {"this fit": dict(result.params)}
    rows.update(PUBLISHED)
    frame = pd.DataFrame(rows).T[["E", "A", "B", "alpha", "beta"]]
    frame["a = beta/(alpha+beta)"] = frame["beta"] / (frame["alpha"] + frame["beta"])
    print(f"{len(table)} points, summed Huber loss (delta 1e-3) of log residuals")
    print(frame.to_string(float_format=lambda v: f"{v:.4g}"))
    print("\n95% bootstrap intervals of this fit:")
    for name, interval in result.ci.items():
        print(f"  {name:>6}: [{interval[0]:.4g}, {interval[1]:.4g}]")
    for warning in result.warnings:
        print(f"warning: {warning}")


if __name__ == "__main__":
    main()
