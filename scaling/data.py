"""Corpora, tokens and batches.

Three kinds of corpus, named by ``DataSpec.corpus``:

- ``stdlib`` (the default): the ``.py`` files of the running interpreter's standard library
  (no site-packages or dist-packages), in sorted path order, as UTF-8 bytes. Tokens are
  bytes (vocabulary 256). Whole files are held out for validation, chosen by a hash of their
  relative path, so the split does not move when a file is added elsewhere. The tokens are
  cached once as two memory-mapped files under ``$SCALING_CACHE_DIR`` (default
  ``~/.cache/scaling``), so every later load takes milliseconds.
- a text file or a folder of text files (``DataSpec.suffixes``): bytes again, with the same
  held-out rule for a folder and the last ``val_fraction`` of a single file.
- a ``.bin`` file: one flat array of ``uint16`` or ``uint32`` token ids
  (``DataSpec.token_dtype``); the last ``val_fraction`` of it is held out.

``Corpus.corpus_id`` is the SHA-256 of the split token arrays (see ``_digest``); every run
stores it, so results trained on different data are never silently mixed.

Batches are a pure function of ``(seed, step)``: a resumed run sees exactly the batches that
an uninterrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaling.errors import DataError
from scaling.spec import DataSpec

log = logging.getLogger(__name__)

BYTE_VOCAB = 256
CACHE_ENV = "SCALING_CACHE_DIR"
# Bump when the way the cached stdlib tokens are made changes, so old caches are not reused.
_CACHE_FORMAT = 1
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus, split into training and held-out tokens."""

    name: str
    """What ``DataSpec.corpus`` said: ``stdlib`` or a path."""
    corpus_id: str
    """SHA-256 (hex) of the split token arrays."""
    n_tokens: int
    """Training plus held-out tokens."""
    vocab_size: int
    """Token ids are below this."""
    train: np.ndarray
    """Training tokens (a memory map for cached and ``.bin`` corpora)."""
    val: np.ndarray
    """Held-out tokens."""


def cache_dir() -> Path:
    """Folder of cached corpora: ``$SCALING_CACHE_DIR``, default ``~/.cache/scaling``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "scaling")


def load_corpus(spec: DataSpec) -> Corpus:
    """Load (building and caching the first time, for ``stdlib``) the corpus of ``spec``.

    Raises
    ------
    DataError
        The corpus is missing, unreadable or empty, too small for one ``seq_len + 1`` window
        of training or held-out tokens, or holds token ids of ``vocab_size`` or more.
    """
    if spec.corpus == "stdlib":
        corpus = _load_stdlib(spec)
    else:
        path = Path(spec.corpus).expanduser()
        if not path.exists():
            raise DataError(f"data.corpus = {spec.corpus!r}: no such file or folder")
        if path.is_file() and path.suffix == ".bin":
            corpus = _load_bin(path, spec)
        else:
            corpus = _load_text(path, spec)
    _check_sizes(corpus, spec)
    return corpus


# --- the standard-library corpus ---------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _source_files(root: Path, suffixes: Iterable[str]) -> list[Path]:
    """Files under ``root`` ending in one of ``suffixes``, sorted by relative path."""
    suffixes = tuple(suffixes)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        found.extend(Path(folder) / f for f in files if f.endswith(suffixes))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _held_out(relative: str, val_fraction: float) -> bool:
    """Whether a file goes to the held-out set: its path's hash falls below the share."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _split_files(root: Path, files: list[Path], val_fraction: float) -> tuple[bytes, bytes]:
    """Concatenate ``files`` as UTF-8 bytes into (train, held-out) by the path-hash rule."""
    train, val = [], []
    for path in files:
        data = _read_bytes(path)
        # The few files that are not UTF-8 (test fixtures in other encodings) are recoded
        # with replacement characters, so the corpus is UTF-8 throughout.
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = data.decode("utf-8", errors="replace").encode("utf-8")
        relative = path.relative_to(root).as_posix()
        (val if _held_out(relative, val_fraction) else train).append(data)
    return b"".join(train), b"".join(val)


def _stdlib_key(root: Path, spec: DataSpec) -> str:
    identity = {
        "format": _CACHE_FORMAT,
        "python": sys.version,
        "root": str(root),
        "val_fraction": spec.val_fraction,
    }
    text = json.dumps(identity, sort_keys=True)
    return (
        f"stdlib-{sys.version_info.major}.{sys.version_info.minor}-"
        + (hashlib.sha256(text.encode()).hexdigest()[:16])
    )


def _load_stdlib(spec: DataSpec) -> Corpus:
    root = stdlib_root()
    folder = cache_dir() / _stdlib_key(root, spec)
    if not (folder / "meta.json").exists():
        _build_stdlib(root, spec, folder)
    meta = json.loads((folder / "meta.json").read_text())
    train = np.memmap(folder / "train.bin", dtype=np.uint8, mode="r")
    val = np.memmap(folder / "val.bin", dtype=np.uint8, mode="r")
    return Corpus("stdlib", meta["corpus_id"], meta["n_tokens"], BYTE_VOCAB, train, val)


def _build_stdlib(root: Path, spec: DataSpec, folder: Path) -> None:
    """Write the stdlib token files into ``folder`` atomically.

    Everything goes into a private temporary folder that is renamed into place at the end;
    when two processes build at once, the second rename fails and that process drops its
    copy and reads the winner's (both are identical).
    """
    started = time.perf_counter()
    files = _source_files(root, [".py"])
    if not files:
        raise DataError(f"{root}: no .py files in the standard-library folder")
    train, val = _split_files(root, files, spec.val_fraction)
    if not val:
        raise DataError(
            f"data.val_fraction = {spec.val_fraction}: no file of {root} falls in the held-out "
            "share; raise it"
        )
    train_arr = np.frombuffer(train, dtype=np.uint8)
    val_arr = np.frombuffer(val, dtype=np.uint8)
    meta = {
        "corpus_id": _digest(train_arr, val_arr),
        "n_tokens": len(train) + len(val),
        "train_tokens": len(train),
        "val_tokens": len(val),
        "files": len(files),
        "root": str(root),
        "python": sys.version,
        "val_fraction": spec.val_fraction,
    }

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        (tmp / "train.bin").write_bytes(train)
        (tmp / "val.bin").write_bytes(val)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():
                raise
            log.debug("%s: built by another process meanwhile; using that copy", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "built the stdlib corpus: %d files, %d tokens (%d held out) in %.1f s -> %s",
        len(files),
        meta["n_tokens"],
        len(val),
        time.perf_counter() - started,
        folder,
    )


# --- user corpora ------------------------------------------------------------------------


def _load_text(path: Path, spec: DataSpec) -> Corpus:
    """A text file (last ``val_fraction`` held out) or a folder (whole files held out)."""
    if path.is_dir():
        files = _source_files(path, spec.suffixes)
        if not files:
            raise DataError(
                f"data.corpus = {str(path)!r}: no files ending in {', '.join(spec.suffixes)}"
            )
        train_bytes, val_bytes = _split_files(path, files, spec.val_fraction)
        if not val_bytes:
            raise DataError(
                f"data.corpus = {str(path)!r}: none of its {len(files)} files falls in the "
                f"held-out share (val_fraction = {spec.val_fraction}); add files or raise it"
            )
        train = np.frombuffer(train_bytes, dtype=np.uint8)
        val = np.frombuffer(val_bytes, dtype=np.uint8)
    else:
        tokens = np.frombuffer(_read_bytes(path), dtype=np.uint8)
        train, val = _split_tail(tokens, spec.val_fraction)
    if len(train) + len(val) == 0:
        raise DataError(f"data.corpus = {str(path)!r}: empty")
    return Corpus(str(path), _digest(train, val), len(train) + len(val), BYTE_VOCAB, train, val)


def _load_bin(path: Path, spec: DataSpec) -> Corpus:
    """A flat token file of ``spec.token_dtype``; the last ``val_fraction`` is held out."""
    dtype = np.dtype(spec.token_dtype)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data.corpus = {str(path)!r}: empty")
    if size % dtype.itemsize:
        raise DataError(
            f"data.corpus = {str(path)!r}: {size} bytes is not a whole number of "
            f"{spec.token_dtype} tokens; is data.token_dtype right?"
        )
    try:
        tokens = np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None

    largest = int(tokens.max())
    vocab = spec.vocab_size if spec.vocab_size is not None else largest + 1
    if largest >= vocab:
        raise DataError(
            f"data.corpus = {str(path)!r}: token id {largest} is not below "
            f"data.vocab_size = {vocab}"
        )
    train, val = _split_tail(tokens, spec.val_fraction)
    return Corpus(str(path), _digest(train, val), len(tokens), vocab, train, val)


def _split_tail(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def _digest(train: np.ndarray, val: np.ndarray) -> str:
    """SHA-256 of a header (dtype and both lengths) and the training then held-out tokens.

    The header makes the id change with the split, not only with the tokens.
    """
    sha = hashlib.sha256(f"{train.dtype.str}:{len(train)}:{len(val)}\n".encode())
    for array in (train, val):
        step = 1 << 24
        for start in range(0, len(array), step):
            sha.update(np.ascontiguousarray(array[start : start + step]).data)
    return sha.hexdigest()


def _check_sizes(corpus: Corpus, spec: DataSpec) -> None:
    window = spec.seq_len + 1
    if len(corpus.train) < window:
        raise DataError(
            f"data.corpus = {corpus.name!r}: {len(corpus.train)} training tokens, too few for "
            f"one window of data.seq_len + 1 = {window}"
        )
    if len(corpus.val) < window:
        raise DataError(
            f"data.corpus = {corpus.name!r}: {len(corpus.val)} held-out tokens, too few for "
            f"one window of data.seq_len + 1 = {window} (data.val_fraction = "
            f"{spec.val_fraction})"
        )


# --- batches -----------------------------------------------------------------------------


def get_batch(
    corpus: Corpus, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``[batch_size, seq_len]`` (int64) for optimiser step ``step``.

    Windows start at random offsets of the training tokens, drawn from a generator seeded by
    ``(seed, step)`` alone, so any step's batch can be recomputed without replaying others.
    """
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, len(corpus.train) - seq_len, size=batch_size)
    windows = corpus.train[starts[:, None] + np.arange(seq_len + 1)]  # [B, T + 1]
    windows = torch.from_numpy(windows.astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def val_windows(corpus: Corpus, seq_len: int, val_tokens: int) -> torch.Tensor:
    """The fixed held-out set: the first ``val_tokens`` held-out tokens as ``seq_len + 1``
    windows side by side, ``[n, seq_len + 1]`` (int64). At least one window."""
    window = seq_len + 1
    n = max(1, min(val_tokens, len(corpus.val)) // window)
    tokens = np.asarray(corpus.val[: n * window]).astype(np.int64)
    return torch.from_numpy(tokens.reshape(n, window))
