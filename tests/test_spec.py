"""Sweep specs: bad input is refused up front with the file and the field named."""

from __future__ import annotations

import pytest
import yaml

from scaling.errors import SpecError
from scaling.spec import load_sweep, parse_sweep

GOOD = {
    "name": "t",
    "data": {"corpus": "stdlib", "seq_len": 32},
    "model": {"family": "gpt", "head_dim": 16},
    "train": {"batch_tokens": 256},
    "plan": {"kind": "grid", "params": [2.0e4], "tokens": [1.0e5]},
}


def _write(tmp_path, raw) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _with(section: str, **changes) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    raw[section] = {**raw[section], **changes}
    return raw


def test_good_spec_loads(tmp_path):
    spec = load_sweep(_write(tmp_path, GOOD))
    assert spec.data.seq_len == 32
    assert spec.plan.kind == "grid"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_with("data", bogus=1), "unknown key 'data.bogus'"),
        ({**GOOD, "extra": 1}, "unknown key 'extra'"),
        (_with("train", lr="fast"), "field 'train.lr' = 'fast'"),
        (_with("train", lr=-1.0), "field 'train.lr' = -1.0: Input should be greater than 0"),
        (_with("data", seq_len=0), "field 'data.seq_len' = 0"),
        (_with("plan", params=[1e4, -5.0]), "field 'plan.params.1' = -5.0"),
        (_with("model", family="rnn"), "field 'model.family' = 'rnn'"),
        ({**GOOD, "name": "a/b"}, "field 'name' = 'a/b'"),
        ({k: v for k, v in GOOD.items() if k != "plan"}, "missing required field 'plan'"),
        (_with("model", num_experts=2, top_k=4), "top_k=4 is more than num_experts=2"),
    ],
)
def test_bad_spec_names_file_and_field(tmp_path, raw, expected):
    path = _write(tmp_path, raw)
    with pytest.raises(SpecError) as err:
        load_sweep(path)
    assert expected in str(err.value)
    assert path in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: sweep spec not found"):
        load_sweep(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_sweep(bad)
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_sweep(bad)


def test_run_id_is_stable_and_sensitive():
    from scaling.plan import plan_sweep

    first = [p.run.run_id for p in plan_sweep(parse_sweep(GOOD))]
    again = [p.run.run_id for p in plan_sweep(parse_sweep(GOOD))]
    other_seed = [p.run.run_id for p in plan_sweep(parse_sweep(_with("train", seed=1)))]
    assert first == again
    assert set(first).isdisjoint(other_seed)
