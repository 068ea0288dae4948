"""Writing a draft's model directory: weights, config with provenance, tokenizer, vocabulary, report."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.core.config import LlamaConfig
from services.core.model_store import DRAFT_VOCAB_FILE, write_manifest

REPORT_FILE = "train_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def draft_provenance(target_dir: Path, layers: Sequence[int]) -> dict[str, Any]:
    """The `specmesh` block of the draft's config.json: what it was sliced from, under which license."""
    target_config = (target_dir / "config.json").read_text()
    return {
        "kind": "draft",
        "draft_of": target_dir.name,
        "target_config_sha256": hashlib.sha256(target_config.encode()).hexdigest(),
        "layers_from_target": list(layers),
        "license": (json.loads(target_config).get("specmesh") or {}).get("license"),
        "source": "specmesh train draft",
    }


def save_draft(
    out_dir: Path,
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    target_dir: Path,
    provenance: dict[str, Any],
    report: dict[str, Any],
    draft_vocab: list[int] | None = None,
) -> Path:
    """Write a standard HF Llama dir atomically (temp dir + rename): weights, config, the
    target's tokenizer files, draft_vocab.json, train_report.json, manifest.json last."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = config.to_hf_dict()
        hf["specmesh"] = provenance
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (target_dir / name).is_file():
                shutil.copyfile(target_dir / name, tmp / name)
        if draft_vocab is not None:
            vocab_doc = {
                "token_ids": draft_vocab,
                "order": "most frequent target token first; restrict the head to a prefix of this list",
                "vocab_size": config.vocab_size,
            }
            (tmp / DRAFT_VOCAB_FILE).write_text(json.dumps(vocab_doc) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        write_manifest(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-old-", dir=out_dir.parent))
            os.rename(out_dir, old / out_dir.name)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def rewrite_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Replace a saved draft's report (measurements taken after saving) and re-seal its manifest."""
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(out_dir)
