"""Regenerate the prompt sets from real offline text (see README.md beside this file).

    python bench/prompts/make_prompts.py

chat: single-line questions of the zlib and xz-utils FAQs shipped in /usr/share/doc.
code: signature + docstring of public functions of a few CPython stdlib modules, verbatim.
Both sources are excluded from draft training (services/draft/training/data.py: is_excluded).
heldout_extra: the remaining qualifying prompts of the same two sources, for benchmarks that
need more than chat's and code's 40 held-out prompts (bench attribute).
identity: a larger mixed set for the greedy identity check (questions of other FAQs, opening
paragraphs of /usr/share/doc READMEs and NEWS files, stdlib function prefixes); it may overlap
draft training, so its acceptance rates are not speed figures.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from services.draft.training.data import (
    BENCH_CHAT_FILES,
    BENCH_CODE_MODULES,
    DOC_ROOT,
    STDLIB,
    faq_questions,
    is_excluded,
    read_text,
)

HERE = Path(__file__).resolve().parent
# Questions that only point at a download, a URL or a mailing list say little about speed.
_SKIP_Q = re.compile(
    r"^(Where|Why do I get|Why am I getting|Ok,|Well|Shouldn't)|Visual Basic|DLL|MVS", re.IGNORECASE
)
PER_FILE = {"FAQ.gz": 12, "faq.txt.gz": 8}
PER_MODULE = 3
MAX_CODE = 20
# A follow-up that needs the previous answer (heldout_extra only: chat.jsonl's slice has none).
_FOLLOW_UP = re.compile(r"^Isn't that\b")

# identity.jsonl: at most this many per kind; every source is reserved-text free (is_excluded) and none is
# a source of chat.jsonl / code.jsonl.
IDENTITY_FAQS = {"sed/sedfaq.txt.gz": 43, "procps/FAQ.gz": 10, "valgrind/FAQ.txt.gz": 4, "lsof/00FAQ.gz": 63}
IDENTITY_DOCS = 60
IDENTITY_CODE = 60
DOC_PREFIX_CHARS = 400
# A question that stands on its own (not "Is this ok?" after an answer, not a title fragment).
_QUESTION = re.compile(r"^(What|How|Why|Can|Could|Is|Are|Does|Do|When|Which|Who|Should|Will|Where)\b")
_DOC_NAME = re.compile(r"^(README|NEWS)(\.md|\.txt)?(\.gz)?$", re.IGNORECASE)
# Boilerplate, links, markup rules and tables rather than prose.
_NOT_PROSE = re.compile(r"copyright|license|https?:|@|={3}|-{3}|\*{3}|#|\t", re.IGNORECASE)


def chat_prompts() -> list[dict]:
    out = []
    for f in BENCH_CHAT_FILES:
        qs = [q for q in faq_questions(f) if not _SKIP_Q.search(q)]
        out += [
            {"prompt": q, "chat": True, "source": f"{f.parent.name}/{f.name}"} for q in qs[: PER_FILE[f.name]]
        ]
    return out


def function_prefixes(path: Path) -> list[tuple[str, str]]:
    """(name, `def` line + docstring verbatim) of public, undecorated top-level functions with a
    short docstring and a body of 3+ statements."""
    src = path.read_text()
    lines = src.splitlines(keepends=True)
    out = []
    for node in ast.parse(src).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
            continue
        doc = node.body[0] if node.body else None
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            continue
        if not 1 <= doc.end_lineno - doc.lineno + 1 <= 12 or len(node.body) < 3:
            continue
        out.append((node.name, "".join(lines[node.lineno - 1 : doc.end_lineno])))
    return out


def code_prompts() -> list[dict]:
    out = []
    for mod in BENCH_CODE_MODULES:
        for name, prefix in function_prefixes(STDLIB / f"{mod}.py")[:PER_MODULE]:
            if len(out) < MAX_CODE:
                out.append({"prompt": prefix, "chat": False, "source": f"cpython-stdlib/{mod}.py:{name}"})
    return out


def extra_heldout_prompts() -> list[dict]:
    """The chat questions after chat.jsonl's slice of each FAQ (follow-ups skipped) and the
    qualifying functions of code.jsonl's modules that code.jsonl leaves out."""
    out = []
    for f in BENCH_CHAT_FILES:
        qs = [q for q in faq_questions(f) if not _SKIP_Q.search(q)][PER_FILE[f.name] :]
        out += [
            {"prompt": q, "chat": True, "source": f"{f.parent.name}/{f.name}"}
            for q in qs
            if not _FOLLOW_UP.match(q)
        ]
    used = {p["source"] for p in code_prompts()}
    for mod in BENCH_CODE_MODULES:
        for name, prefix in function_prefixes(STDLIB / f"{mod}.py"):
            source = f"cpython-stdlib/{mod}.py:{name}"
            if source not in used:
                out.append({"prompt": prefix, "chat": False, "source": source})
    return out


def spread(items: list, n: int) -> list:
    """`n` items evenly spaced over `items` (all of them when there are fewer)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def faq_identity_prompts() -> list[dict]:
    out = []
    for rel, n in IDENTITY_FAQS.items():
        qs = [q for q in faq_questions(DOC_ROOT / rel) if _QUESTION.match(q)]
        out += [{"prompt": q, "chat": True, "source": rel} for q in spread(qs, n)]
    return out


def _is_prose(par: str) -> bool:
    lines = par.splitlines()
    letters = sum(c.isalpha() or c == " " for c in par)
    return (
        len(par) >= 200
        and letters / len(par) > 0.85
        and len(par) / len(lines) > 40  # not a list of names
        and par[0].isalpha()
        and not _NOT_PROSE.search(par)
    )


def doc_identity_prompts() -> list[dict]:
    """The first prose paragraph of one README / NEWS file per /usr/share/doc package, cut at a
    word boundary: raw text the model continues."""
    found = []
    for d in sorted(p for p in DOC_ROOT.iterdir() if p.is_dir() and not is_excluded(p / "README")):
        for f in sorted(p for p in d.iterdir() if p.is_file() and _DOC_NAME.match(p.name)):
            pars = [re.sub(r"[ \t]+\n", "\n", p).strip() for p in re.split(r"\n\s*\n", read_text(f, 100_000))]
            par = next((p for p in pars if _is_prose(p)), None)
            if par:
                cut = par[:DOC_PREFIX_CHARS].rsplit(" ", 1)[0] if len(par) > DOC_PREFIX_CHARS else par
                found.append({"prompt": cut, "chat": False, "source": f"{d.name}/{f.name}"})
                break
    return spread(found, IDENTITY_DOCS)


def code_identity_prompts() -> list[dict]:
    """The first qualifying function prefix (as in code.jsonl) of each top-level stdlib module
    that code.jsonl does not use."""
    found = []
    for path in sorted(STDLIB.glob("*.py")):
        if path.stem.startswith("_") or path.stem in BENCH_CODE_MODULES or is_excluded(path):
            continue
        prefix = next(iter(function_prefixes(path)), None)
        if prefix:
            found.append(
                {"prompt": prefix[1], "chat": False, "source": f"cpython-stdlib/{path.name}:{prefix[0]}"}
            )
    return spread(found, IDENTITY_CODE)


def identity_prompts() -> list[dict]:
    return faq_identity_prompts() + doc_identity_prompts() + code_identity_prompts()


def main() -> None:
    sets = (
        ("chat.jsonl", chat_prompts()),
        ("code.jsonl", code_prompts()),
        ("identity.jsonl", identity_prompts()),
        ("heldout_extra.jsonl", extra_heldout_prompts()),
    )
    for name, rows in sets:
        with (HERE / name).open("w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
