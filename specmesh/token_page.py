"""One self-contained HTML page of token heat maps: attribution (which context tokens each
generated token depends on) and uncertainty (how sure the model was, token by token), as in
"Visualizing Uncertainty in Translation Tasks" (arXiv 2501.17187).

The page is one file with its style, script and data inline, so it opens from disk or a mail
attachment with no server and no network. The data are the JSON objects `specmesh attribute
--json` and `specmesh uncertainty --json` print; the page's script draws every token with
textContent, so token texts are never parsed as markup.
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any


def _script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--` or `&` can end or change it."""
    text = json.dumps(data, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(
    title: str,
    meta: str = "",
    *,
    attribution: dict | None = None,
    uncertainty: dict | None = None,
) -> str:
    """The page's HTML. `attribution` is `specmesh attribute --json`'s object (context and target
    tokens, one importance per context token per target token); `uncertainty` is `specmesh
    uncertainty --json`'s (tokens with probability, entropy and kurtosis, the sequence means) plus
    `start`, the index of its first token."""
    if attribution is None and uncertainty is None:
        raise ValueError("a token page needs attribution or uncertainty data")
    template = resources.files("specmesh").joinpath("token_page.html").read_text(encoding="utf-8")
    fields = {
        "TITLE": html.escape(title),
        "META": html.escape(meta),
        "DATA": _script_json({"attribution": attribution, "uncertainty": uncertainty}),
    }
    # one pass, so a title that reads "__DATA__" stays a title
    return re.sub(r"__(TITLE|META|DATA)__", lambda m: fields[m.group(1)], template)


def write(path: str | Path, page: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
