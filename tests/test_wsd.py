"""WSD branching: a grid over D costs one stable-phase trunk per size plus short cooldowns."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd
import pytest

from scaling.errors import SpecError
from scaling.fit import fit, load_source
from scaling.launch import run_sweep
from scaling.plan import plan_sweep
from scaling.results import CURVES_SCHEMA, load_curves, load_runs
from scaling.spec import RunSpec, parse_sweep
from scaling.train import _Loop, run_lr, train_run
from scaling.wsd import branch_point, trunk_id

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000))
STEPS = [12, 24, 36]  # D = steps * 128 tokens; cooldowns of 3, 6, 9 steps


def _raw(corpus: Path, **train: object) -> dict:
    return {
        "name": "wsd",
        "data": {"corpus": str(corpus), "seq_len": 16, "val_tokens": 1024},
        "model": {"aspect_ratio": 16, "head_dim": 8},
        "train": {
            "batch_tokens": 128,
            "lr": 1.0e-2,
            "schedule": "wsd",
            "cooldown_fraction": 0.25,
            "eval_points": 4,
            "log_interval": 5,
            "threads": 1,
            **train,
        },
        "plan": {"kind": "grid", "params": [3e3, 1.2e4], "tokens": [s * 128 for s in STEPS]},
    }


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_plan_makes_branches_of_one_trunk_per_size(corpus: Path) -> None:
    planned = plan_sweep(parse_sweep(_raw(corpus)))
    assert len(planned) == 6
    rows = [p.summary() for p in planned]
    trunks = {r["branched_from"] for r in rows}
    assert len(trunks) == 2 and None not in trunks
    assert len({r["run_id"] for r in rows} | trunks) == 8
    for p, r in zip(planned, rows, strict=True):
        assert p.run.branches == STEPS
        assert r["branch_step"] == p.run.steps - round(0.25 * p.run.steps)
    # Only the trunk from the previous branch point on, and the cooldown, are trained.
    assert [p.trained_tokens // 128 for p in planned[:3]] == [12, 24 - 9, 36 - 18]


def test_branch_lr_is_the_trunk_then_its_own_cooldown(corpus: Path) -> None:
    planned = plan_sweep(parse_sweep(_raw(corpus, warmup_fraction=0.1)))
    short, long = planned[0].run, planned[2].run
    peak = short.train.lr
    # The trunk warms up over 10% of the longest branch (4 steps) in every branch ...
    assert [run_lr(s, short) for s in range(4)] == [run_lr(s, long) for s in range(4)]
    assert run_lr(3, short) == peak and run_lr(2, short) < peak
    # ... stays at the peak up to each branch point, then decays to the floor at its end.
    assert [run_lr(s, short) for s in range(4, 9)] == [peak] * 5
    assert run_lr(9, short) < peak and run_lr(11, short) == pytest.approx(0.1 * peak)
    assert run_lr(26, long) == peak and run_lr(35, long) == pytest.approx(0.1 * peak)


def test_warmup_past_the_first_branch_point_is_refused(corpus: Path) -> None:
    with pytest.raises(SpecError, match="plan.tokens: the shortest branch"):
        plan_sweep(parse_sweep(_raw(corpus, warmup_fraction=0.5)))


def test_grid_of_branches_trains_fits_and_matches_standalone_runs(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_sweep(_raw(corpus))
    planned = plan_sweep(spec)
    trained_steps: list[int] = []
    finish_step = _Loop.finish_step

    def counting(loop: _Loop) -> None:
        trained_steps.append(loop.step)
        finish_step(loop)

    with monkeypatch.context() as patch:
        patch.setattr(_Loop, "finish_step", counting)
        outcome = run_sweep(spec, tmp_path / "results", show_progress=False)
    sweep_dir = tmp_path / "results" / "wsd"
    assert len(outcome.trained) == 6 and not outcome.failed
    # One trunk per size plus the cooldowns: 36 + 3 + 6 steps each, not 12 + 24 + 36.
    assert len(trained_steps) == 2 * (36 + 3 + 6)
    assert not list((sweep_dir / "checkpoints").glob("*.pt"))  # trunk checkpoints cleaned

    runs = load_runs(sweep_dir).set_index("run_id")
    assert set(runs.index) == {p.run.run_id for p in planned}
    assert (runs["status"] == "done").all()
    for p in planned:
        row = runs.loc[p.run.run_id]
        assert row["tokens"] == p.run.tokens and row["branched_from"] == trunk_id(p.run)
        assert row["compute"] == p.run.tokens * p.counts.flops_6n
    assert sorted(runs["tokens"].unique()) == [s * 128 for s in STEPS]
    assert runs.groupby("branched_from").size().tolist() == [3, 3]

    # Branches of one trunk share the stable-phase prefix of their curves exactly.
    curves = load_curves(sweep_dir)
    columns = [c for c in CURVES_SCHEMA.names if c not in ("run_id", "tokens_per_second")]
    for _, group in runs.groupby("branched_from"):
        by_steps = {int(r["steps"]): rid for rid, r in group.iterrows()}
        curve = {
            s: curves[curves["run_id"] == rid].reset_index(drop=True) for s, rid in by_steps.items()
        }
        for short, long in [(12, 24), (12, 36), (24, 36)]:
            point = branch_point(short, spec.train)
            a = curve[short][curve[short]["step"] <= point][columns]
            b = curve[long][curve[long]["step"] <= point][columns]
            assert a["step"].iloc[-1] == point and not pd.isna(a["val_loss"].iloc[-1])
            pd.testing.assert_frame_equal(a, b)
            assert curve[short]["step"].iloc[-1] == short
            assert curve[short]["val_loss"].iloc[-1] == group.loc[by_steps[short], "loss"]

    # A chinchilla fit runs on the 6 branch points.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 6 points for 5 parameters: expected diagnostics
        result = fit(load_source(sweep_dir), law="chinchilla")
    assert result.n_points == 6 and all(math.isfinite(v) for v in result.params.values())

    # A branch is the standalone wsd run of its N and D: same batches by step, same stable
    # learning rate; here the warm-ups agree too (under one step), so bit for bit.
    for p in (planned[0], planned[2]):
        alone = RunSpec.model_validate({**p.run.model_dump(), "branches": []})
        row = train_run(alone, tmp_path / "alone")
        assert row["loss"] == runs.loc[p.run.run_id, "loss"]
        assert row["train_loss"] == runs.loc[p.run.run_id, "train_loss"]


def test_branch_resumes_from_the_trunk_checkpoint(corpus: Path, tmp_path: Path) -> None:
    spec = parse_sweep(_raw(corpus, checkpoint_interval=0))
    planned = plan_sweep(spec)[:3]
    sweep_dir = tmp_path / "sweep"
    # The shortest branch leaves trunk checkpoints at its branch point (9 steps).
    train_run(planned[0].run, sweep_dir)
    ckpts = sorted(p.name for p in (sweep_dir / "checkpoints").glob("*.pt"))
    assert ckpts == [f"{trunk_id(planned[0].run)}-step9.pt"]

    steps: list[int] = []
    longest = train_run(planned[2].run, sweep_dir, progress=lambda s, n: steps.append(s))
    assert steps[0] == 10 and steps[-1] == 36  # picked the trunk up at step 9
    # The middle branch still needs a checkpoint: the one at 18 that the longest left.
    assert sorted(p.name for p in (sweep_dir / "checkpoints").glob("*.pt")) == [
        f"{trunk_id(planned[0].run)}-step18.pt"
    ]
    steps.clear()
    middle = train_run(planned[1].run, sweep_dir, progress=lambda s, n: steps.append(s))
    assert steps == list(range(19, 25))  # from the checkpoint at 18: its 6 cooldown steps
    assert not list((sweep_dir / "checkpoints").glob("*.pt"))

    fresh = train_run(planned[2].run, tmp_path / "fresh")
    assert longest["loss"] == fresh["loss"]
    assert middle["status"] == "done"
