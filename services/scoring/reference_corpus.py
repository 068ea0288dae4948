"""The recipe of DC-PDD's reference token frequencies: token counts over the plain-text package
documentation of a Debian system (/usr/share/doc), tokenised by the scored model's tokenizer.

    python -m services.scoring.reference_corpus --model smollm2-135m-instruct \
        --out services/scoring/data/smollm2-135m-instruct.token_counts.npy

Deterministic for a given file system: files are read in sorted path order, the first
MAX_BYTES of each (so a few huge changelogs do not swamp the rest), and the JSON written beside
the counts records the files' sha256. Left out, because they are reserved for evaluating the
scores: git's documentation, anything FAQ-like, and the documentation of scikit-learn, redis,
grpc, opentelemetry, safetensors and gguf packages. The shipped table for SmolLM2 lives in
services/scoring/data/ (192 KiB), so a service never needs the corpus at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

from services.core.model_store import resolve_model
from services.core.scoring.reference import count_tokens, save_counts, vocab_digest
from services.core.tokenizer import Tokenizer

DOC_ROOT = Path("/usr/share/doc")
MAX_BYTES = 64 * 1024
NAME = re.compile(r"^(README.*|NEWS.*|.*\.md|.*\.txt)$", re.IGNORECASE)
RESERVED = re.compile(r"git|faq|sklearn|scikit|redis|grpc|opentelemetry|safetensors|gguf", re.IGNORECASE)
DATA_DIR = Path(__file__).parent / "data"


def corpus_files(root: Path = DOC_ROOT) -> list[Path]:
    """Plain-text documentation files under root, sorted, minus the reserved ones."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and NAME.match(path.name) and not RESERVED.search(rel):
            out.append(path)
    return out


def read_texts(files: list[Path]) -> tuple[list[str], str]:
    """The files' first MAX_BYTES as text (files that are not UTF-8 skipped) and a sha256 over the
    (path, bytes) pairs used, which identifies the corpus."""
    texts, h = [], hashlib.sha256()
    for path in files:
        raw = path.read_bytes()[:MAX_BYTES]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            # a cut through the last character is ours to drop; anything else is not UTF-8 text
            text = raw[: e.start].decode("utf-8") if e.start >= len(raw) - 3 else ""
        if not text.strip():
            continue
        texts.append(text)
        h.update(path.as_posix().encode() + b"\0" + text.encode() + b"\0")
    return texts, h.hexdigest()


def build(model: str, out: Path, root: Path = DOC_ROOT) -> Path:
    model_dir = Path(resolve_model(model))
    tokenizer = Tokenizer.from_dir(model_dir)
    files = corpus_files(root)
    texts, corpus_sha = read_texts(files)
    counts = count_tokens(texts, tokenizer, tokenizer.vocab_size)
    meta = {
        "corpus": f"plain-text files under {root} (README*, NEWS*, *.md, *.txt), "
        f"first {MAX_BYTES} bytes each",
        "excluded": RESERVED.pattern,
        "files": len(texts),
        "corpus_sha256": corpus_sha,
        "tokenizer_vocab_sha256": vocab_digest(tokenizer),
        "model": model_dir.name,
        "command": f"python -m services.scoring.reference_corpus --model {model} --out <this .npy>",
    }
    save_counts(out, counts, meta)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", type=Path, default=DATA_DIR / "smollm2-135m-instruct.token_counts.npy")
    p.add_argument("--root", type=Path, default=DOC_ROOT)
    args = p.parse_args(argv)
    print(build(args.model, args.out, args.root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
