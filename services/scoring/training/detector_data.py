"""The learned detector's data set: human paragraphs from a real corpus, machine continuations
of their openings, fixed splits and a manifest.

- Human text: prose paragraphs of the plain-text package documentation on this machine
  (/usr/share/doc README / NEWS / *.txt / *.md, the files `services.scoring.reference_corpus`
  reads, with the same reserved ones left out: git's documentation, FAQs, and the documentation
  of the packages reserved for evaluation). A paragraph qualifies when it is at least
  MIN_CHARS long and at least 85% letters and spaces (so tables, changelog lists and code do
  not); at most PER_FILE paragraphs per file and PER_PACKAGE per package, evenly spaced (Node.js
  alone ships more than half of the machine's qualifying paragraphs).
- Machine text: the generator's continuation of the first OPENING_TOKENS tokens of the same
  paragraph, conditioned on the start-of-document token as the scorer conditions every text,
  sampled at temperature 0.8 with top-k 200 then top-p 0.95 (seeded per paragraph), and cut
  to the human text's token count (the human text is cut to the machine one's when the
  generator stops early), so length alone separates nothing. In-distribution generator: the
  scored model itself (SmolLM2-135M-Instruct). "Unseen" generator: the test split's paragraphs continued by
  another model (the stack's draft; Gemma 3 270M, the model the issue names, is not on this
  machine and nothing may be downloaded).
- Splits by document (a file's paragraphs all fall in one split, chosen by a hash of its path):
  about 70% train, 10% validation, 20% test, so no test text shares a document with a training
  one. (By package, one package would have held most of the data in one split.)
- Files: `{train,val,test,test_unseen}.jsonl`, one `{"text", "label", "package", "document",
  "generator", "tokens"}` per line (label 1 = machine; tokens = the pair's length in the generator's
  tokens); `manifest.json` with the configuration and each file's sha256; and, derived from
  them for `specmesh bench detect`, `test{,_unseen}_{human,machine}.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.core.engine import Engine
from services.core.params import SamplingConfig
from services.core.sampling import probabilities
from services.core.tokenizer import Tokenizer
from services.scoring.convert import start_token_id
from services.scoring.reference_corpus import DOC_ROOT, corpus_files

MIN_CHARS = 200
PER_FILE = 6
PER_PACKAGE = 150
OPENING_TOKENS = 16
MAX_TOKENS = 96  # tokens per text (human and machine alike)
# top-k 200 first: the same law as SamplingConfig(0.8, top_k=200, top_p=0.95), with the top-p sort
# over 200 candidates instead of the 49k vocabulary (the sort was a third of the generation time)
TOP_K = 200
SAMPLING = SamplingConfig(temperature=0.8, top_p=0.95)
SPLITS = ("train", "val", "test")
FORMAT = "specmesh-detector-data/1"
_PROSE_SHARE = 0.85


@dataclass(frozen=True)
class Paragraph:
    package: str
    document: str  # the file's path under the corpus root
    text: str


def split_of(document: str) -> str:
    """The split a document's paragraphs belong to (stable: a hash of its path)."""
    bucket = int(hashlib.sha256(document.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 7 else "val" if bucket == 7 else "test"


def prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of a plain-text document that read as prose, whitespace collapsed."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = re.sub(r"\s+", " ", block).strip()
        if len(para) >= MIN_CHARS and sum(c.isalpha() or c == " " for c in para) / len(para) >= _PROSE_SHARE:
            out.append(para)
    return out


def human_paragraphs(root: Path = DOC_ROOT) -> list[Paragraph]:
    """The qualifying paragraphs under root, in sorted file order (deterministic), at most
    PER_PACKAGE of a package's, evenly spaced over its files."""
    by_package: dict[str, list[Paragraph]] = {}
    for path in corpus_files(root):
        try:
            text = path.read_bytes()[: 64 * 1024].decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        rel = path.relative_to(root)
        found = [Paragraph(rel.parts[0], rel.as_posix(), p) for p in prose_paragraphs(text)[:PER_FILE]]
        by_package.setdefault(rel.parts[0], []).extend(found)
    out = []
    for paragraphs in by_package.values():
        step = len(paragraphs) / PER_PACKAGE if len(paragraphs) > PER_PACKAGE else 1
        out += [paragraphs[int(i * step)] for i in range(min(len(paragraphs), PER_PACKAGE))]
    return out


@torch.inference_mode()
def continue_openings(
    engine: Engine,
    start_token: int,
    openings: list[list[int]],
    lengths: list[int],
    seeds: list[int],
    stop_ids: set[int],
    sampling: SamplingConfig = SAMPLING,
) -> list[list[int]]:
    """Sampled continuations, one per opening, `lengths[i]` tokens at most (fewer at a stop
    token, which is not kept); all sequences decode together, one batched forward a step."""
    seqs = [engine.new_sequence() for _ in openings]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out: list[list[int]] = [[] for _ in openings]
    try:
        logits, _ = engine.forward(seqs, [[start_token, *o] for o in openings], last_only=True)
        rows = [lg[0] for lg in logits]
        live = list(range(len(openings)))
        while live:
            step = []
            for i, row in zip(live, rows, strict=True):
                values, candidates = row.topk(min(TOP_K, row.shape[-1]))
                pick = torch.multinomial(probabilities(values, sampling), 1, generator=gens[i])
                token = int(candidates[pick])
                if token in stop_ids:
                    continue
                out[i].append(token)
                if len(out[i]) < lengths[i]:
                    step.append(i)
            live = step
            if live:
                logits, _ = engine.forward(
                    [seqs[i] for i in live], [[out[i][-1]] for i in live], last_only=True
                )
                rows = [lg[0] for lg in logits]
    finally:
        for s in seqs:
            s.release()
    return out


def pairs(
    paragraphs: list[Paragraph],
    engine: Engine,
    tokenizer: Tokenizer,
    generator_name: str,
    *,
    batch: int = 32,
    seed: int = 0,
    progress: Callable[[int], None] = lambda n: None,
) -> Iterator[tuple[dict, dict]]:
    """(human, machine) records for each paragraph long enough to continue, in order."""
    start = start_token_id(tokenizer)
    stop = set(tokenizer.eos_token_ids) | {start}
    usable = []
    for i, p in enumerate(paragraphs):
        ids = tokenizer.encode(p.text)[:MAX_TOKENS]
        if len(ids) >= OPENING_TOKENS + 16:
            usable.append((i, p, ids))
    progress(len(paragraphs) - len(usable))  # too short to continue: done with at once
    for b in range(0, len(usable), batch):
        chunk = usable[b : b + batch]
        conts = continue_openings(
            engine,
            start,
            [ids[:OPENING_TOKENS] for _, _, ids in chunk],
            [len(ids) - OPENING_TOKENS for _, _, ids in chunk],
            [seed * 1_000_003 + i for i, _, _ in chunk],
            stop,
        )
        for (_, p, ids), cont in zip(chunk, conts, strict=True):
            n = OPENING_TOKENS + len(cont)
            # tokens: as generated, the same on both sides
            common = {"package": p.package, "document": p.document, "tokens": n}
            human = {"text": tokenizer.decode(ids[:n]), "label": 0, "generator": "human"} | common
            machine_text = tokenizer.decode(ids[:OPENING_TOKENS] + cont)
            machine = {"text": machine_text, "label": 1, "generator": generator_name} | common
            yield human, machine
        progress(len(chunk))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class DataConfig:
    model: str
    unseen_generator: str | None
    max_paragraphs: int | None = None  # None: every qualifying paragraph
    seed: int = 0


def build(
    out: Path,
    config: DataConfig,
    engine: Engine,
    tokenizer: Tokenizer,
    unseen: Engine | None,
    paragraphs: list[Paragraph],
    progress: Callable[[int], None] = lambda n: None,
) -> dict:
    """Write the data set into `out` (replacing it once complete); returns the manifest."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    test_paragraphs = [p for p in paragraphs if split_of(p.document) == "test"]
    for human, machine in pairs(
        paragraphs, engine, tokenizer, config.model, seed=config.seed, progress=progress
    ):
        by_split[split_of(human["document"])] += [human, machine]
    files = {s: tmp / f"{s}.jsonl" for s in SPLITS}
    for s in SPLITS:
        write_jsonl(files[s], by_split[s])
    if unseen is not None and config.unseen_generator:
        rows = []
        for human, machine in pairs(
            test_paragraphs,
            unseen,
            tokenizer,
            config.unseen_generator,
            seed=config.seed + 1,
            progress=progress,
        ):
            rows += [human, machine]
        files["test_unseen"] = tmp / "test_unseen.jsonl"
        write_jsonl(files["test_unseen"], rows)
    manifest = {
        "format": FORMAT,
        "config": asdict(config)
        | {
            "opening_tokens": OPENING_TOKENS,
            "max_tokens": MAX_TOKENS,
            "min_chars": MIN_CHARS,
            "per_file": PER_FILE,
            "per_package": PER_PACKAGE,
            "sampling": asdict(SAMPLING) | {"top_k": TOP_K},
            "corpus": str(DOC_ROOT),
        },
        "files": {f.name: {"sha256": sha256_file(f), "texts": len(read_jsonl(f))} for f in files.values()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


def write_bench_views(data_dir: Path) -> list[Path]:
    """`<split>_human.jsonl` / `<split>_machine.jsonl` for the test splits, the two files
    `specmesh bench detect --human H --machine M` reads (derived from the manifest's files, so
    not in it). Returns the files written."""
    written = []
    for split in ("test", "test_unseen"):
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl(path)
        for label, side in ((0, "human"), (1, "machine")):
            view = data_dir / f"{split}_{side}.jsonl"
            write_jsonl(view, [r for r in rows if r["label"] == label])
            written.append(view)
    return written


def verify(data_dir: Path) -> dict | None:
    """The manifest when every file it lists is present with its sha256, else None."""
    path = data_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT:
        return None
    for name, meta in manifest.get("files", {}).items():
        f = data_dir / name
        if not f.is_file() or sha256_file(f) != meta["sha256"]:
            return None
    return manifest
