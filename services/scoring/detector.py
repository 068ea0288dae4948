"""The learned machine-text detector the scoring service serves as DETECT_METHOD_PAWN.

`specmesh train detector` writes `<scored model dir>/detector/`:

- `detector.onnx`: services.core.scoring.pawn.PawnNet. Inputs `features` [B, T, F], `hidden`
  [B, T, H], `mask` [B, T] (float32, B and T dynamic); output `logit` [B];
- `detector.safetensors`: the same network's torch weights (the path without onnxruntime, and
  the reference the ONNX file is checked against);
- `detector.json`: sizes, the model it was trained on (weights digest, hidden size), the data
  set's manifest digest and the training report (AUROC per split).

`load_detector` refuses a detector made for other weights (its inputs are that model's hidden
states and distributions) with FAILED_PRECONDITION naming the command that makes a matching one.
onnxruntime takes the CUDA provider when `onnxruntime-gpu` provides it, else the CPU one
(services.runtime.onnx_backend).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.core.engine import Engine, weights_digest
from services.core.errors import FailedPrecondition
from services.core.scoring.features import TokenFeatures
from services.core.scoring.pawn import FEATURE_NAMES, PawnNet, token_inputs
from services.runtime.onnx_backend import inference_session, resolve_backend

log = logging.getLogger(__name__)

DETECTOR_DIR = "detector"
ONNX_FILE = "detector.onnx"
WEIGHTS_FILE = "detector.safetensors"
CONFIG_FILE = "detector.json"
FORMAT = "specmesh-detector/1"
INPUT_NAMES = ("features", "hidden", "mask")
OUTPUT_NAME = "logit"

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], np.ndarray]


def default_detector_dir(model_dir: Path) -> Path:
    return Path(model_dir) / DETECTOR_DIR


def model_identity(model_dir: Path, engine: Engine) -> dict[str, Any]:
    """What a detector is tied to: the scored model's name, weights digest and hidden size."""
    return {
        "model": Path(model_dir).name,
        "model_digest": weights_digest(Path(model_dir)),
        "hidden_size": engine.config.hidden_size,
        "features": list(FEATURE_NAMES),
    }


class Detector:
    """Logits of texts from their TokenFeatures (with hidden states), on onnxruntime or torch."""

    def __init__(self, score: Scorer, backend: str, config: dict[str, Any]) -> None:
        self._score = score
        self.backend = backend
        self.config = config

    def logits(self, texts: list[TokenFeatures]) -> list[float]:
        """One logit per text (sigmoid = probability of machine-written); each text's
        TokenFeatures must carry `hidden` [n, H]."""
        n = max(len(f.logprob) for f in texts)
        F, H = len(FEATURE_NAMES), texts[0].hidden.shape[-1]
        features = torch.zeros(len(texts), n, F)
        hidden = torch.zeros(len(texts), n, H)
        mask = torch.zeros(len(texts), n)
        for b, f in enumerate(texts):
            t = len(f.logprob)
            features[b, :t] = token_inputs(f)
            hidden[b, :t] = f.hidden.float()
            mask[b, :t] = 1.0
        return [float(x) for x in self._score(features, hidden, mask)]


def onnx_scorer(path: Path) -> tuple[Scorer, str]:
    session, provider = inference_session(path)

    def score(features: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        feeds = {n: x.numpy() for n, x in zip(INPUT_NAMES, (features, hidden, mask), strict=True)}
        return session.run([OUTPUT_NAME], feeds)[0]

    return score, provider


def torch_scorer(path: Path, hidden_size: int, width: int) -> Scorer:
    from safetensors.torch import load_file

    net = PawnNet(hidden_size, width=width)
    net.load_state_dict(load_file(path))
    net.eval()

    @torch.inference_mode()
    def score(features: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        return net(features, hidden, mask).numpy()

    return score


def train_command(model_dir: Path) -> str:
    return f"specmesh train detector --model {Path(model_dir).name}"


def load_detector(detector_dir: Path, engine: Engine, model_dir: Path, *, backend: str = "auto") -> Detector:
    """The detector in detector_dir for the model `engine` serves (loaded from model_dir).
    backend: "onnxruntime", "torch" or "auto" (onnxruntime when importable). Raises
    FailedPrecondition when files are missing or the detector was trained for other weights."""
    detector_dir, model_dir = Path(detector_dir), Path(model_dir)
    hint = train_command(model_dir)
    path = detector_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FailedPrecondition(
            f"no detector in {detector_dir}; train one with `{hint}`", "detector"
        ) from None
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"{path} is unreadable ({exc}); retrain with `{hint}`", "detector") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise FailedPrecondition(f"{path}: not a {FORMAT} file; retrain with `{hint}`", "detector")
    here = model_identity(model_dir, engine)
    for key in ("hidden_size", "model_digest", "features"):
        if config.get(key) != here[key]:
            raise FailedPrecondition(
                f"{path} was trained for other weights: {key} {config.get(key)!r} there, {here[key]!r} "
                f"for {model_dir}; retrain with `{hint}`",
                "detector",
            )
    backend = resolve_backend(backend, "learned detector")
    file = detector_dir / (ONNX_FILE if backend == "onnxruntime" else WEIGHTS_FILE)
    if not file.is_file():
        raise FailedPrecondition(f"{file} is missing; retrain with `{hint}`", "detector")
    if backend == "onnxruntime":
        score, provider = onnx_scorer(file)
        log.info("detector %s on onnxruntime (%s)", detector_dir, provider)
    else:
        score = torch_scorer(file, config["hidden_size"], config["width"])
        log.info("detector %s on torch", detector_dir)
    return Detector(score, backend, config)
