"""The local model directory: list, verify and resolve HF-layout model dirs (torch-free).

Layout: `<root>/<name>/` with model.safetensors (fp32), config.json, tokenizer.json,
tokenizer_config.json, generation_config.json and manifest.json (sha256 + size of each
file). The directory is plain HF layout, so transformers loads it offline as a reference.

Importing a GGUF file needs torch (dequantization) and lives in `model_import`; nothing here
imports torch, gguf or safetensors, so the gateway can use `resolve_model` without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.config import LlamaConfig
from services.core.errors import InvalidArgument, NotFound

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "manifest.json"
MODEL_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
IMPORT_HINT = "run `specmesh models import smollm2` to import the default model"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    num_parameters: int
    size_bytes: int
    verified: bool | None  # None when listed without verification
    source: str | None = None
    license: str | None = None


def model_root() -> Path:
    """`$SPECMESH_MODEL_DIR`, else `~/.cache/specmesh/models`."""
    env = os.environ.get("SPECMESH_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specmesh" / "models"


def count_parameters(cfg: LlamaConfig) -> int:
    """Parameter count implied by a Llama config (tied head counted once)."""
    h, hd = cfg.hidden_size, cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size + 2 * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + cfg.num_hidden_layers * per_layer + h + head


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (max 128)", field="name"
        )


# --- manifest ---------------------------------------------------------------------------------


def write_manifest(model_dir: str | Path) -> dict[str, Any]:
    d = Path(model_dir)
    files = {
        p.name: {"sha256": _sha256(p), "size": p.stat().st_size}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")  # caches, temp files
    }
    manifest = {"version": 1, "hash": "sha256", "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def _is_complete(d: Path) -> bool:
    """Cheap check (no hashing): manifest present, lists every model file, sizes match."""
    return manifest_complete(d, MODEL_FILES)


def manifest_complete(d: Path, required: Iterable[str]) -> bool:
    """Cheap check (no hashing): d's manifest lists every `required` file (paths relative to d)
    and every file it lists is there with the recorded size."""
    m = _read_manifest(d)
    if m is None or not set(required) <= m["files"].keys():
        return False
    for name, meta in m["files"].items():
        p = d / name
        if not p.is_file() or p.stat().st_size != meta.get("size"):
            return False
    return True


def verify_manifest(model_dir: str | Path) -> bool:
    """True iff manifest.json exists and every listed file has the recorded size and sha256."""
    d = Path(model_dir)
    if not _is_complete(d):
        return False
    m = _read_manifest(d)
    assert m is not None
    return all(_sha256(d / name) == meta.get("sha256") for name, meta in m["files"].items())


# --- lookup -----------------------------------------------------------------------------------


def list_models(root: str | Path | None = None, verify: bool = True) -> list[ModelInfo]:
    """Models under root (dirs with config.json), sorted by name; `verify` hashes every file."""
    root = Path(root) if root is not None else model_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (d / "config.json").is_file():
            continue
        raw = json.loads((d / "config.json").read_text())
        meta = raw.get("specmesh") or {}
        out.append(
            ModelInfo(
                name=d.name,
                path=d,
                num_parameters=count_parameters(LlamaConfig.from_hf_dict(raw)),
                size_bytes=sum(p.stat().st_size for p in d.iterdir() if p.is_file()),
                verified=verify_manifest(d) if verify else None,
                source=meta.get("source"),
                license=meta.get("license"),
            )
        )
    return out


def resolve_model(name_or_path: str | Path, root: str | Path | None = None) -> Path:
    """A model directory from a path (any HF Llama dir) or a name in the store."""
    s = str(name_or_path).strip()
    if not s:
        raise InvalidArgument(f"model must be a name or a directory; {IMPORT_HINT}", field="model")
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return p.resolve()
        raise NotFound(f"{p} is a directory but has no config.json (not a model directory)", field="model")
    root = Path(root) if root is not None else model_root()
    if _NAME_RE.match(s) and (root / s / "config.json").is_file():
        return root / s
    available = [m.name for m in list_models(root, verify=False)]
    listing = ", ".join(available) if available else "none"
    raise NotFound(
        f"model {s!r} not found: not a directory, and no model of that name in {root} "
        f"(available: {listing}); {IMPORT_HINT}, or pass a path to a HF Llama directory",
        field="model",
    )


DRAFT_VOCAB_FILE = "draft_vocab.json"  # a trained draft's truncated vocabulary (train draft)


def load_draft_vocab(model_dir: str | Path, size: int | None = None) -> list[int] | None:
    """Token ids of a draft's truncated vocabulary (most frequent first), or None if it has none."""
    p = Path(model_dir) / DRAFT_VOCAB_FILE
    if not p.is_file():
        return None
    ids = json.loads(p.read_text())["token_ids"]
    return ids[:size] if size else ids
