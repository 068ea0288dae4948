"""Regenerate chat.jsonl and code.jsonl from real offline text (see README.md beside this file).

    python bench/prompts/make_prompts.py

chat: single-line questions of the zlib and xz-utils FAQs shipped in /usr/share/doc.
code: signature + docstring of public functions of a few CPython stdlib modules, verbatim.
Both sources are excluded from draft training (services/draft/training/data.py: is_excluded).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from services.draft.training.data import BENCH_CHAT_FILES, BENCH_CODE_MODULES, STDLIB, faq_questions

HERE = Path(__file__).resolve().parent
# Questions that only point at a download, a URL or a mailing list say little about speed.
_SKIP_Q = re.compile(
    r"^(Where|Why do I get|Why am I getting|Ok,|Well|Shouldn't)|Visual Basic|DLL|MVS", re.IGNORECASE
)
PER_FILE = {"FAQ.gz": 12, "faq.txt.gz": 8}
PER_MODULE = 3
MAX_CODE = 20


def chat_prompts() -> list[dict]:
    out = []
    for f in BENCH_CHAT_FILES:
        qs = [q for q in faq_questions(f) if not _SKIP_Q.search(q)]
        out += [
            {"prompt": q, "chat": True, "source": f"{f.parent.name}/{f.name}"} for q in qs[: PER_FILE[f.name]]
        ]
    return out


def code_prompts() -> list[dict]:
    out = []
    for mod in BENCH_CODE_MODULES:
        path = STDLIB / f"{mod}.py"
        src = path.read_text()
        lines = src.splitlines(keepends=True)
        taken = 0
        for node in ast.parse(src).body:
            if taken >= PER_MODULE or len(out) >= MAX_CODE:
                break
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            doc = node.body[0] if node.body else None
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
                continue
            if not 1 <= doc.end_lineno - doc.lineno + 1 <= 12 or len(node.body) < 3:
                continue
            prefix = "".join(lines[node.lineno - 1 : doc.end_lineno])
            out.append({"prompt": prefix, "chat": False, "source": f"cpython-stdlib/{mod}.py:{node.name}"})
            taken += 1
    return out


def main() -> None:
    for name, rows in (("chat.jsonl", chat_prompts()), ("code.jsonl", code_prompts())):
        with (HERE / name).open("w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
