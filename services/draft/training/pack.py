"""Portable training data for `specmesh train draft`: a tokenized corpus + chat prompts in one file.

Why: the default sources (stdlib, man pages, docs; see `data`) are read from the machine that
trains. A GPU box is often a bare image without man pages or docs and without network, so the
data is gathered where it exists (`specmesh train pack`) and carried as one compressed file.

Format: a NumPy `.npz` (zip, deflate) holding
- `tokens`   uint16 [N]  document token ids, concatenated (no separators);
- `offsets`  int64 [D+1] document d is tokens[offsets[d]:offsets[d+1]];
- `prompts`  uint8       UTF-8 JSON list of chat questions (held-out rules already applied);
- `meta`     uint8       UTF-8 JSON: tokenizer sha256, token/document counts, seed.
uint16 is enough for vocabularies up to 65536 ids (SmolLM2: 49152); larger ones are refused.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.errors import InvalidArgument, NotFound

FORMAT = "specmesh-draft-data/1"


def tokenizer_sha256(model_dir: str | Path) -> str:
    """Identity of a model's tokenizer: the sha256 of its tokenizer.json."""
    return hashlib.sha256((Path(model_dir) / "tokenizer.json").read_bytes()).hexdigest()


@dataclass
class DataPack:
    tokens: np.ndarray  # uint16 [N]
    offsets: np.ndarray  # int64 [D + 1]
    prompts: list[str]
    meta: dict[str, Any]

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> list[int]:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]].astype(np.int64).tolist()


def build_pack(
    out: str | Path,
    documents: Iterable[str],
    encode: Callable[[str], list[int]],
    prompts: Sequence[str],
    *,
    tokenizer_sha: str,
    max_tokens: int,
    doc_max_tokens: int = 8192,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize `documents` until `max_tokens`, keeping at most `doc_max_tokens` of each (a random
    window, so long files don't crowd out the rest), and write the pack. Returns its meta."""
    if max_tokens <= 0:
        raise InvalidArgument(f"--tokens must be positive, got {max_tokens}", field="tokens")
    rng = random.Random(seed)
    parts: list[np.ndarray] = []
    total = 0
    for text in documents:
        ids = encode(text)
        if not ids:
            continue
        if max(ids) > np.iinfo(np.uint16).max:
            raise InvalidArgument("token ids above 65535 do not fit a data pack", field="tokenizer")
        if len(ids) > doc_max_tokens:
            off = rng.randrange(len(ids) - doc_max_tokens)
            ids = ids[off : off + doc_max_tokens]
        ids = ids[: max_tokens - total]
        parts.append(np.asarray(ids, dtype=np.uint16))
        total += len(ids)
        if progress:
            progress(len(ids))
        if total >= max_tokens:
            break
    if not parts:
        raise InvalidArgument("no documents to pack", field="documents")
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    meta = {
        "format": FORMAT,
        "tokenizer_sha256": tokenizer_sha,
        "tokens": int(total),
        "documents": len(parts),
        "prompts": len(prompts),
        "doc_max_tokens": doc_max_tokens,
        "seed": seed,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez_compressed(
            f,
            tokens=np.concatenate(parts),
            offsets=offsets,
            prompts=np.frombuffer(json.dumps(list(prompts)).encode(), dtype=np.uint8),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
    return meta


def load_pack(path: str | Path, tokenizer_sha: str | None = None) -> DataPack:
    """Read a pack; with `tokenizer_sha`, refuse one made with another tokenizer."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"data pack {p} does not exist", field="data")
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            pack = DataPack(z["tokens"], z["offsets"], json.loads(z["prompts"].tobytes()), meta)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidArgument(f"{p} is not a specmesh data pack: {e}", field="data") from e
    if meta.get("format") != FORMAT:
        raise InvalidArgument(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}", field="data")
    if tokenizer_sha is not None and meta.get("tokenizer_sha256") != tokenizer_sha:
        raise InvalidArgument(
            f"{p} was tokenized with another tokenizer than the target's (sha256 "
            f"{str(meta.get('tokenizer_sha256'))[:12]}… vs {tokenizer_sha[:12]}…); rebuild it with "
            "`specmesh train pack --target <that target>`",
            field="data",
        )
    return pack


def pack_documents(packs: Sequence[DataPack], seed: int = 0) -> Iterator[list[int]]:
    """Endless stream of token documents from all packs, reshuffled every pass."""
    index = [(k, d) for k, pk in enumerate(packs) for d in range(pk.num_documents)]
    if not index:
        raise InvalidArgument("the data packs hold no documents", field="data")
    rng = random.Random(seed)
    while True:
        rng.shuffle(index)
        for k, d in index:
            yield packs[k].document(d)
