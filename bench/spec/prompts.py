"""Prompt sets: JSONL files of ``{"prompt": ..., "chat": true|false}``, and their token ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PromptKey = tuple[str, int]  # (set name, prompt index)


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    chat: bool
    source: str | None = None


@dataclass
class PromptSet:
    name: str
    path: str
    items: list[PromptItem]


def load_prompt_set(path: str | Path, limit: int | None = None, name: str | None = None) -> PromptSet:
    """JSONL, one ``{"prompt": str, "chat": bool}`` per line (``chat`` defaults to true; a bare JSON
    string is a chat prompt); blank lines are skipped; the first `limit` prompts are kept."""
    path = Path(path)
    items: list[PromptItem] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ValueError(f'{path}:{n}: expected {{"prompt": "...", "chat": true|false}}')
        chat = obj.get("chat", True)
        if not isinstance(chat, bool):
            raise ValueError(f'{path}:{n}: "chat" must be true or false, got {chat!r}')
        source = obj.get("source")
        items.append(PromptItem(obj["prompt"], chat, source if isinstance(source, str) else None))
    if not items:
        raise ValueError(f"{path}: no prompts")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        items = items[:limit]
    return PromptSet(name or path.stem, str(path), items)


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Set names from file stems, suffixed _2, _3 ... where two files share a stem."""
    names: list[str] = []
    for p in paths:
        base, name, k = p.stem, p.stem, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def load_prompt_sets(paths: Sequence[Path], limit: int | None) -> list[PromptSet]:
    return [load_prompt_set(p, limit, n) for p, n in zip(paths, unique_names(paths), strict=True)]


def encode_prompts(sets: Sequence[PromptSet], tokenizer: Any) -> dict[PromptKey, list[int]]:
    """Token ids of every prompt: chat prompts through the target's chat template (one user
    message and the generation prompt), the others as raw text."""
    prompt_ids: dict[PromptKey, list[int]] = {}
    for ps in sets:
        for i, item in enumerate(ps.items):
            ids = (
                tokenizer.encode_chat([{"role": "user", "content": item.prompt}])
                if item.chat
                else tokenizer.encode(item.prompt)
            )
            if not ids:
                raise ValueError(f"{ps.path}: prompt {i} encodes to no tokens")
            prompt_ids[(ps.name, i)] = ids
    return prompt_ids
