"""The image model directory: what `specmesh train image` writes and the service loads.

<dir>/image.json          layout (codebook size, grid) and the VQ config
<dir>/vq.safetensors      VQ tokenizer (encoder, decoder, codebook)
<dir>/judge.safetensors   quality judge
<dir>/ar/, <dir>/draft/   HF Llama directories (config.json, model.safetensors, manifest.json)
<dir>/train_report.json   recipe, data manifest, reconstruction / accuracy / NLL figures
<dir>/manifest.json       sha256 and size of every file above (subdirectories by their manifest)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from services.core.config import LlamaConfig
from services.core.errors import NotFound
from services.core.model_store import manifest_complete, model_root, write_manifest
from services.image.judge import Judge
from services.image.layout import Layout
from services.image.vq import VQVAE, VQConfig

DEFAULT_NAME = "digits-image"
REPORT_FILE = "train_report.json"


# what a loadable directory holds (manifest.json lists them, ar/ and draft/ through their own)
IMAGE_FILES = ("image.json", "vq.safetensors", "judge.safetensors", "ar/manifest.json", "draft/manifest.json")
LLAMA_FILES = ("config.json", "model.safetensors")


def default_dir() -> Path:
    return model_root() / DEFAULT_NAME


def is_complete(path: str | Path) -> bool:
    """Cheap check (sizes against the manifests, no hashing) that `path` holds every file
    save_image_models writes: what `train image --if-missing` skips training for. The directory
    appears by one rename, so a half-written one is a foreign or damaged directory."""
    d = Path(path)
    return manifest_complete(d, IMAGE_FILES) and all(
        manifest_complete(d / sub, LLAMA_FILES) for sub in ("ar", "draft")
    )


def _save_llama(d: Path, config: LlamaConfig, model) -> None:
    from safetensors.torch import save_file

    d.mkdir()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.hf_state_dict().items()}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf_dict()
    hf["specmesh"] = {"kind": "image-ar", "source": "specmesh train image", "license": "Apache-2.0"}
    (d / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_manifest(d)


def save_image_models(
    out_dir: Path, layout: Layout, vq: VQVAE, judge: Judge, target, draft, report: dict
) -> Path:
    """Write atomically (temp dir + rename). target, draft: (LlamaConfig, TrainLlama)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        meta = {"codebook_size": layout.codebook_size, "grid": layout.grid, "vq": vq.c.to_dict()}
        (tmp / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name, module in (("vq", vq), ("judge", judge)):
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / f"{name}.safetensors"))
        _save_llama(tmp / "ar", *target)
        _save_llama(tmp / "draft", *draft)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        manifest = write_manifest(tmp)
        for sub in ("ar", "draft"):  # the subdirectories count through their own manifests
            f = tmp / sub / "manifest.json"
            manifest["files"][f"{sub}/manifest.json"] = {
                "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                "size": f.stat().st_size,
            }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass
class ImageModels:
    dir: Path
    layout: Layout
    vq: VQVAE
    judge: Judge

    @property
    def target_dir(self) -> Path:
        return self.dir / "ar"

    @property
    def draft_dir(self) -> Path:
        return self.dir / "draft"


def load_image_models(path: str | Path | None = None) -> ImageModels:
    from safetensors.torch import load_file

    d = Path(path) if path else default_dir()
    if not (d / "image.json").is_file():
        raise NotFound(f"no image models in {d}; run `specmesh train image` first", "model")
    meta = json.loads((d / "image.json").read_text())
    vq = VQVAE(VQConfig(**meta["vq"]))
    vq.load_state_dict(load_file(str(d / "vq.safetensors")))
    judge = Judge()
    judge.load_state_dict(load_file(str(d / "judge.safetensors")))
    return ImageModels(d, Layout(meta["codebook_size"], meta["grid"]), vq.eval(), judge.eval())
