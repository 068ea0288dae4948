"""DC-PDD's reference table: counting, add-one smoothing, the .npy + JSON round trip, and the
corpus recipe's file selection (reserved evaluation sources left out)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from services.core.scoring.reference import count_tokens, load_counts, log_frequencies, save_counts
from services.scoring.reference_corpus import corpus_files, read_texts


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]


def test_counts_smoothing_and_round_trip(tmp_path: Path) -> None:
    counts = count_tokens(["abca", "c"], CharTokenizer(), vocab_size=4)
    assert counts.tolist() == [2, 1, 2, 0]
    # (c + 1) / (N + V) with N = 5, V = 4
    assert log_frequencies(counts).exp().tolist() == pytest.approx([3 / 9, 2 / 9, 3 / 9, 1 / 9])
    path = tmp_path / "t.npy"
    save_counts(path, counts, {"corpus": "test"})
    back, meta = load_counts(path)
    assert back.tolist() == counts.tolist() and back.dtype == np.int64
    assert meta == {"corpus": "test", "vocab_size": 4, "total_tokens": 5}
    assert math.isclose(float(log_frequencies(back).exp().sum()), 1.0)


def test_corpus_recipe_skips_reserved_and_non_text(tmp_path: Path) -> None:
    files = {
        "zstd/README.md": "zstd readme",
        "dpkg/spec/triggers.txt": "triggers",
        "git/README.md": "reserved: git documentation",
        "python3-doc/faq/general.txt": "reserved: the Python FAQ",
        "redis-tools/NEWS": "reserved",
        "foo/copyright": "not one of the names",
        "latin1/README": b"caf\xe9 au lait",
        "cut/README": b"ok \xc3",  # cut through a 2-byte character
    }
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    picked = [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)]
    assert picked == ["cut/README", "dpkg/spec/triggers.txt", "latin1/README", "zstd/README.md"]
    texts, digest = read_texts(corpus_files(tmp_path))
    assert texts == ["ok ", "triggers", "zstd readme"]  # latin-1 is not UTF-8 text: skipped
    assert read_texts(corpus_files(tmp_path))[1] == digest and len(digest) == 64
