"""The reference token-frequency distribution DC-PDD (arXiv 2409.14781) calibrates against:
token counts over a corpus of ordinary text, stored as a small .npy (never pickle) with a JSON
note of where the counts came from and which tokenizer made them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.core.tokenizer import Tokenizer


def count_tokens(texts: Iterable[str], tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """Occurrences of every token id over `texts` -> [vocab_size] int64."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for text in texts:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def log_frequencies(counts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """log f(v) with add-one (Laplace) smoothing, as DC-PDD's reference code does, so a token the
    corpus never shows gets a small, finite frequency -> [V] float64."""
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    return ((c + 1) / (c.sum() + len(c))).log()


def save_counts(path: Path, counts: np.ndarray, meta: dict[str, Any]) -> None:
    """counts -> path (.npy, uint32: a 49k vocabulary takes 192 KiB) and meta -> path.json."""
    if counts.max(initial=0) >= 2**32:
        raise ValueError("token counts overflow uint32")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, counts.astype(np.uint32), allow_pickle=False)
    meta = {**meta, "vocab_size": len(counts), "total_tokens": int(counts.sum())}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_counts(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    counts = np.load(path, allow_pickle=False).astype(np.int64)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return counts, meta


def vocab_digest(tokenizer: Tokenizer) -> str:
    """sha256 of the token -> id map: two tokenizers with the same digest give the same ids, so a
    count table (or an observer model) made with one fits the other."""
    vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
