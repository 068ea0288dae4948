"""Real offline text for draft training, and what is held out of it.

Sources (all present on a plain Debian/Ubuntu + CPython machine, nothing downloaded):

- corpus: the CPython standard library source (`sysconfig`'s stdlib dir, never
  site-packages), rendered manual pages under /usr/share/man (not git's), and plain-text
  documentation under /usr/share/doc;
- chat prompts: questions from FAQ files under /usr/share/doc, plus instructions built
  from man page NAME lines ("ls - list directory contents") and stdlib docstring
  summaries, through a few fixed templates.

Held out (never trained on, see `is_excluded`): the sources of the benchmark prompt sets
in bench/prompts (the zlib and xz FAQs; the stdlib modules in `BENCH_CODE_MODULES` and
their tests), and the texts reserved for independent evaluation: git's documentation and
man pages, the Python FAQ, and third-party package sources (site-packages, dist-packages).
A missing source is skipped, so the stdlib alone is enough to train on.
"""

from __future__ import annotations

import ast
import gzip
import os
import random
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MAN_ROOT = Path("/usr/share/man")
DOC_ROOT = Path("/usr/share/doc")

# Benchmark prompt sources (bench/prompts/README.md): kept out of every training set.
BENCH_CODE_MODULES = (
    "bisect",
    "textwrap",
    "shlex",
    "statistics",
    "heapq",
    "fnmatch",
    "calendar",
    "difflib",
)
BENCH_CHAT_FILES = (DOC_ROOT / "zlib1g-dev" / "FAQ.gz", DOC_ROOT / "xz-utils" / "faq.txt.gz")
_BENCH_DOC_DIRS = ("zlib1g", "zlib1g-dev", "xz-utils", "liblzma5", "liblzma-dev")
# Reserved for independent evaluation: never training data.
_RESERVED_PARTS = ("site-packages", "dist-packages", "pydoc_data")
_RESERVED_DOC_DIRS = ("git", "git-man", "python3", "python3.11", "python3-minimal", "python3.11-minimal")
_RESERVED_NAME = re.compile(r"(^|[/_-])(git|faq\.py)([._-]|$)", re.IGNORECASE)

TRAIN_FAQ_FILES = (
    DOC_ROOT / "sed" / "sedfaq.txt.gz",
    DOC_ROOT / "lsof" / "00FAQ.gz",
    DOC_ROOT / "procps" / "FAQ.gz",
    DOC_ROOT / "valgrind" / "FAQ.txt.gz",
    DOC_ROOT / "man-db" / "FAQ",
)


def is_excluded(path: Path) -> bool:
    """True for files held out of training (benchmark sources and reserved evaluation texts)."""
    parts = path.parts
    if any(p in _RESERVED_PARTS for p in parts) or _RESERVED_NAME.search(path.name):
        return True
    if path.is_relative_to(DOC_ROOT) and len(parts) > len(DOC_ROOT.parts):
        d = parts[len(DOC_ROOT.parts)]
        if d in _RESERVED_DOC_DIRS or d in _BENCH_DOC_DIRS or d.startswith("git"):
            return True
    if path.is_relative_to(STDLIB) and path.suffix == ".py":
        stem = path.stem
        if stem in BENCH_CODE_MODULES or stem.removeprefix("test_") in BENCH_CODE_MODULES:
            return True
    return False


def read_text(path: Path, limit: int = 400_000) -> str:
    """Text of a file (transparently gunzipped), '' when unreadable or binary."""
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as f:
            raw = f.read(limit)
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    if b"\x00" in raw[:4096]:
        return ""
    return raw.decode("utf-8", errors="replace")


# --- corpus ---------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    return sorted(p for p in STDLIB.rglob("*.py") if not is_excluded(p))


def man_files(max_per_prefix: int = 200) -> list[Path]:
    """English man pages (sections 1-8), git's excluded; at most `max_per_prefix` per 4-letter
    prefix so the thousands of near-identical pages of one tool (gcloud) don't dominate."""
    if not MAN_ROOT.is_dir():
        return []
    out, per_prefix = [], {}
    for sec in sorted(MAN_ROOT.glob("man[1-8]")):
        for p in sorted(sec.iterdir()):
            if not p.is_file() or is_excluded(p):
                continue
            key = p.name[:4]
            per_prefix[key] = per_prefix.get(key, 0) + 1
            if per_prefix[key] <= max_per_prefix:
                out.append(p)
    return out


def doc_files() -> list[Path]:
    if not DOC_ROOT.is_dir():
        return []
    pat = re.compile(r"^(README|NEWS|FAQ|TODO|AUTHORS|THANKS|.*\.txt|.*\.md)(\.gz)?$", re.IGNORECASE)
    return sorted(p for p in DOC_ROOT.rglob("*") if p.is_file() and pat.match(p.name) and not is_excluded(p))


_HAVE_MAN = shutil.which("man") is not None


def render_man(path: Path) -> str:
    """A man page as plain text: `man -l` when installed, else the roff source minus its macros."""
    if _HAVE_MAN:
        try:
            r = subprocess.run(
                ["man", "-l", "-E", "UTF-8", str(path)],
                capture_output=True,
                timeout=20,
                env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "MANPAGER": "cat"},
            )
            text = r.stdout.decode("utf-8", errors="replace")
            text = re.sub(r".\x08", "", text)  # overstrike bold/underline
            if text.strip():
                return text
        except (OSError, subprocess.TimeoutExpired):
            pass
    src = read_text(path)
    lines = [
        re.sub(r"\\f[BIRP]|\\-|\\\(..|\\&", "", ln) for ln in src.splitlines() if not ln.startswith('.\\"')
    ]
    return "\n".join(ln[ln.find(" ") + 1 :] if ln.startswith(".") else ln for ln in lines)


def corpus_documents(seed: int = 0, weights: tuple[float, float, float] = (0.5, 0.35, 0.15)) -> Iterator[str]:
    """Endless stream of documents: stdlib source / man pages / doc texts mixed by `weights`,
    each source reshuffled every pass. Missing sources drop out of the mix."""
    rng = random.Random(seed)
    sources = [(stdlib_files(), read_text), (man_files(), render_man), (doc_files(), read_text)]
    live = [(files, reader, w) for (files, reader), w in zip(sources, weights, strict=True) if files]
    if not live:
        raise RuntimeError(f"no training text found (looked in {STDLIB}, {MAN_ROOT}, {DOC_ROOT})")
    orders = [[] for _ in live]
    while True:
        i = rng.choices(range(len(live)), weights=[w for _, _, w in live])[0]
        files, reader, _ = live[i]
        if not orders[i]:
            orders[i] = rng.sample(files, len(files))
        text = reader(orders[i].pop())
        if len(text.strip()) > 200:
            yield text


# --- chat prompts ---------------------------------------------------------------------------------

_Q_LINE = re.compile(r"^\s*(?:Q:\s*|\d+(?:\.\d+)*\.?\s+)?([A-Z][^?]{8,160}\?)\s*$")


def faq_questions(path: Path) -> list[str]:
    """Single-line questions of a FAQ file ("4.10. How do I ...?", "Q: What ...?")."""
    out = []
    for line in read_text(path).splitlines():
        m = _Q_LINE.match(line)
        if m and not re.search(r"\?\?\?|0x[0-9A-F]", line):
            out.append(re.sub(r"\s+", " ", m.group(1)).strip())
    return list(dict.fromkeys(out))


_NAME_RE = re.compile(r"^\.SH\s+\"?NAME\"?\s*$", re.IGNORECASE | re.MULTILINE)


def man_name_line(path: Path) -> tuple[str, str] | None:
    """(command, one-line description) from a man page's NAME section."""
    src = read_text(path, limit=20_000)
    m = _NAME_RE.search(src)
    if not m:
        return None
    body = []
    for ln in src[m.end() :].splitlines():
        if ln.startswith(".SH"):
            break
        if ln.strip() and not ln.startswith(('.\\"', ".PD", ".IX", ".nh", ".ad", ".hy")):
            body.append(re.sub(r"^\.[A-Z]{1,2}\s*", "", ln))
    text = re.sub(r"\\f[BIRP]|\\&|\\\(..|\\s[-+]?\d", "", " ".join(body)).replace("\\-", "-")
    name, sep, desc = text.partition(" - ")
    name, desc = name.split(",")[0].strip(), desc.strip().rstrip(".")
    if not sep or not re.fullmatch(r"[A-Za-z][\w.+-]{0,40}", name) or not 8 <= len(desc) <= 120:
        return None
    return name, desc


_MAN_TEMPLATES = (
    "What does `{cmd}` do?",
    "How do I use `{cmd}`? It is described as: {desc}.",
    "Explain what `{cmd}` ({desc}) is for and give a short example.",
    "What is `{cmd}` used for on Linux?",
)
_PY_TEMPLATES = (
    "What does `{qual}` do in Python?",
    "Explain the Python function `{qual}`: {doc}",
    "Write a short example that uses `{qual}` from the Python standard library.",
    "How would I implement something like `{qual}` myself? Its documentation says: {doc}",
)


def stdlib_docstring_items(files: list[Path], limit: int) -> list[tuple[str, str]]:
    """(qualified name, first docstring sentence) of public stdlib functions."""
    out = []
    for p in files:
        if "test" in p.parts or "idlelib" in p.parts:
            continue
        try:
            tree = ast.parse(read_text(p))
        except (SyntaxError, ValueError):
            continue
        mod = ".".join(p.relative_to(STDLIB).with_suffix("").parts).removesuffix(".__init__")
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                first = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
                if 15 <= len(first) <= 200:
                    out.append((f"{mod}.{node.name}", first))
        if len(out) >= limit:
            break
    return out


def chat_prompts(seed: int = 0, max_templated: int = 6000) -> list[str]:
    """Deterministic, de-duplicated, shuffled pool of chat questions (bench prompts excluded)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    for f in TRAIN_FAQ_FILES:
        if f.is_file() and not is_excluded(f):
            prompts += faq_questions(f)
    names = [x for x in (man_name_line(p) for p in man_files(max_per_prefix=5)) if x]
    rng.shuffle(names)
    for cmd, desc in names[: max_templated // 2]:
        t = rng.choice(_MAN_TEMPLATES)
        prompts.append(t.format(cmd=cmd, desc=desc))
    files = stdlib_files()
    rng.shuffle(files)
    for qual, doc in stdlib_docstring_items(files, max_templated // 2):
        prompts.append(rng.choice(_PY_TEMPLATES).format(qual=qual, doc=doc))
    prompts = list(dict.fromkeys(prompts))
    rng.shuffle(prompts)
    return prompts
