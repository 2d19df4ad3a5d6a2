"""Corpora, the stdlib cache, held-out splits and deterministic batches."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scaling.data import (
    cache_dir,
    get_batch,
    load_corpus,
    stdlib_root,
    val_windows,
)
from scaling.errors import DataError
from scaling.spec import DataSpec


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _folder(root: Path, n: int = 60, size: int = 400) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"f{i:03d}.txt").write_bytes(bytes([65 + i % 26]) * size)
    (root / "skip.bin").write_bytes(b"\xff" * 100)  # not a listed suffix
    return root


def _load_in_process(cache: str) -> str:
    import os

    os.environ["SCALING_CACHE_DIR"] = cache
    return load_corpus(DataSpec()).corpus_id


def test_stdlib_corpus_build_cache_and_race(_cache: Path) -> None:
    # Two processes build the cache at once: both succeed with the same corpus.
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        ids = pool.map(_load_in_process, [str(_cache)] * 2)
    assert ids[0] == ids[1]
    assert [p.name for p in _cache.iterdir() if p.name.startswith(".")] == []

    started = time.perf_counter()
    corpus = load_corpus(DataSpec())
    assert time.perf_counter() - started < 1.0
    assert corpus.corpus_id == ids[0] and len(corpus.corpus_id) == 64
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    assert isinstance(corpus.train, np.memmap)
    assert corpus.n_tokens == len(corpus.train) + len(corpus.val)
    assert 0.01 < len(corpus.val) / corpus.n_tokens < 0.15  # about val_fraction = 0.05
    # The tokens are the stdlib's own bytes: argparse.py is in there, site-packages is not.
    assert (stdlib_root() / "argparse.py").read_bytes()[:2000] in corpus.train.tobytes() + (
        corpus.val.tobytes()
    )


def test_folder_split_is_by_file_and_stable(tmp_path: Path) -> None:
    root = _folder(tmp_path / "texts")
    spec = DataSpec(corpus=str(root), seq_len=16, val_fraction=0.2)
    corpus = load_corpus(spec)
    assert corpus.n_tokens == 60 * 400  # skip.bin is not read
    assert len(corpus.val) % 400 == 0 and len(corpus.val) > 0
    assert load_corpus(spec).corpus_id == corpus.corpus_id
    other = load_corpus(spec.model_copy(update={"val_fraction": 0.3}))
    assert other.corpus_id != corpus.corpus_id


def test_single_file_holds_out_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(bytes(range(256)) * 8)
    corpus = load_corpus(DataSpec(corpus=str(path), seq_len=16, val_fraction=0.25))
    assert len(corpus.val) == 512
    assert corpus.val.tobytes() == path.read_bytes()[-512:]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_token_file(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / "tokens.bin"
    tokens = (np.arange(10_000) % 1000).astype(dtype)
    tokens.tofile(path)
    corpus = load_corpus(DataSpec(corpus=str(path), seq_len=32, token_dtype=dtype))
    assert corpus.vocab_size == 1000
    assert len(corpus.val) == 500 and corpus.val[-1] == tokens[-1]
    with pytest.raises(DataError, match="token id 999 is not below data.vocab_size = 500"):
        load_corpus(DataSpec(corpus=str(path), token_dtype=dtype, vocab_size=500))
    assert load_corpus(DataSpec(corpus=str(path), vocab_size=4096, token_dtype=dtype)).vocab_size


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt.*no such file"):
        load_corpus(DataSpec(corpus=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        load_corpus(DataSpec(corpus=str(empty)))
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(DataError, match="small.txt.*too few for one window"):
        load_corpus(DataSpec(corpus=str(small), seq_len=128))
    with pytest.raises(DataError, match="held-out tokens, too few"):
        load_corpus(DataSpec(corpus=str(small), seq_len=20))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(DataError, match="odd.bin.*not a whole number"):
        load_corpus(DataSpec(corpus=str(odd)))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing.*no files ending in"):
        load_corpus(DataSpec(corpus=str(tmp_path / "nothing")))


def test_batches_are_a_function_of_seed_and_step(tmp_path: Path) -> None:
    corpus = load_corpus(DataSpec(corpus=str(_folder(tmp_path / "t")), seq_len=16))
    x, y = get_batch(corpus, 8, 16, seed=1, step=5)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    again, _ = get_batch(corpus, 8, 16, seed=1, step=5)
    assert torch.equal(x, again)
    assert not torch.equal(x, get_batch(corpus, 8, 16, seed=1, step=6)[0])
    assert not torch.equal(x, get_batch(corpus, 8, 16, seed=2, step=5)[0])


def test_val_windows_are_the_head_of_the_held_out_tokens(tmp_path: Path) -> None:
    corpus = load_corpus(DataSpec(corpus=str(_folder(tmp_path / "t")), seq_len=16))
    windows = val_windows(corpus, 16, 100)
    assert windows.shape == (5, 17)  # 100 // 17
    assert windows.flatten().numpy().tobytes() == np.asarray(corpus.val[:85], np.int64).tobytes()


def test_cache_dir_from_environment(_cache: Path) -> None:
    assert cache_dir() == _cache
