"""The token router the draft service consults under the r2r policy (R2R, arXiv 2505.21600).

`specmesh train router` writes `<draft dir>/router/`:

- `router.onnx`: the RouterNet of services.core.routing with a sigmoid on top. Inputs `hidden`
  [n, H], `embedding` [n, H], `top_logprobs` [n, k] (float32, n dynamic); output `divergence`
  [n], the probability that each token diverges;
- `router.safetensors`: the same network's torch weights (the fallback without onnxruntime);
- `router.json`: sizes, the threshold, the draft it was trained for and the training report.

`load_router` refuses a router made for another draft (hidden size, weights digest, draft
vocabulary size) with FAILED_PRECONDITION and the command that makes a matching one: its
inputs come from that draft's hidden states and logits, and another draft's mean something
else. Loading reads two small files and builds one onnxruntime session (tens of ms).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from services.core.engine import Engine, weights_digest
from services.core.errors import FailedPrecondition
from services.core.model_store import model_root
from services.core.routing import RouterNet, router_inputs
from services.runtime.onnx_backend import inference_session, resolve_backend

log = logging.getLogger(__name__)

ROUTER_DIR = "router"
ONNX_FILE = "router.onnx"
WEIGHTS_FILE = "router.safetensors"
CONFIG_FILE = "router.json"
FORMAT = "specmesh-router/1"
INPUT_NAMES = ("hidden", "embedding", "top_logprobs")
OUTPUT_NAME = "divergence"  # probabilities in [0, 1], one per token


def default_router_dir(draft_dir: Path) -> Path:
    """Where a draft's router lives: beside its weights (not in its manifest, which lists files)."""
    return Path(draft_dir) / ROUTER_DIR


def draft_identity(draft_dir: Path, engine: Engine) -> dict[str, Any]:
    """What a router is tied to: the draft's name, weights digest (sha256 of its manifest.json,
    which holds the sha256 of every weight file and of draft_vocab.json), hidden size and the
    number of logit columns it is served with (its truncated vocabulary)."""
    columns = len(engine.vocab_ids) if engine.vocab_ids is not None else engine.config.vocab_size
    return {
        "draft": Path(draft_dir).name,
        "draft_digest": weights_digest(Path(draft_dir)),
        "hidden_size": engine.config.hidden_size,
        "draft_vocab_size": columns,
    }


def train_command(draft_dir: Path, router_dir: Path) -> str:
    """The command that (re)makes a router for this draft in router_dir."""
    draft_dir, router_dir = Path(draft_dir), Path(router_dir)
    in_store = (model_root() / draft_dir.name).resolve() == draft_dir.resolve()
    cmd = f"specmesh train router --draft {draft_dir.name if in_store else draft_dir}"
    if router_dir.resolve() != default_router_dir(draft_dir).resolve():
        cmd += f" --out {router_dir}"
    return cmd


class _Scorer(Protocol):
    def __call__(self, hidden: torch.Tensor, embedding: torch.Tensor, top: torch.Tensor) -> np.ndarray: ...


class Router:
    """Divergence probabilities for the draft's tokens, on onnxruntime or torch."""

    def __init__(
        self, score: _Scorer, embedding: torch.Tensor, top_k: int, threshold: float, backend: str
    ) -> None:
        self._score = score
        self._embedding = embedding  # [V, H] the draft's input embedding (shared with the engine)
        self.top_k = top_k
        self.threshold = threshold
        self.backend = backend

    def divergence(self, hidden: torch.Tensor, logits: torch.Tensor, token_ids: torch.Tensor) -> list[float]:
        """hidden [n, H] and logits [n, C] where the draft predicted each token, token_ids [n]
        (full-vocabulary ids) -> the probability that each token diverges."""
        h, e, top = router_inputs(hidden, logits, token_ids, self._embedding, self.top_k)
        return self._score(h, e, top).tolist()


def _onnx_scorer(path: Path) -> tuple[_Scorer, str]:
    session, provider = inference_session(path)

    def score(hidden: torch.Tensor, embedding: torch.Tensor, top: torch.Tensor) -> np.ndarray:
        feeds = {n: x.cpu().numpy() for n, x in zip(INPUT_NAMES, (hidden, embedding, top), strict=True)}
        return session.run([OUTPUT_NAME], feeds)[0]

    return score, provider


def _torch_scorer(path: Path, hidden_size: int, top_k: int, width: int) -> _Scorer:
    from safetensors.torch import load_file

    net = RouterNet(hidden_size, top_k, width)
    net.load_state_dict(load_file(path))
    net.eval()

    @torch.inference_mode()
    def score(hidden: torch.Tensor, embedding: torch.Tensor, top: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(net(hidden, embedding, top)).numpy()

    return score


def _read_config(router_dir: Path, hint: str) -> dict[str, Any]:
    path = router_dir / CONFIG_FILE
    if not path.is_file():
        what = "does not exist" if not router_dir.is_dir() else f"has no {CONFIG_FILE}"
        raise FailedPrecondition(f"router directory {router_dir} {what}; train one with `{hint}`", "router")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"{path} is unreadable ({e}); retrain with `{hint}`", "router") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise FailedPrecondition(
            f"{path}: format {found!r}, expected {FORMAT!r}; retrain with `{hint}`", "router"
        )
    return config


def load_router(router_dir: Path, engine: Engine, draft_dir: Path, *, backend: str = "auto") -> Router:
    """The router in router_dir for the draft `engine` serves (loaded from draft_dir, prepared
    as served: its truncated vocabulary applied). backend: "onnxruntime", "torch", or "auto"
    (onnxruntime when importable, else torch). Raises FailedPrecondition when files are missing
    or router.json was written for another draft."""
    router_dir, draft_dir = Path(router_dir), Path(draft_dir)
    hint = train_command(draft_dir, router_dir)
    config = _read_config(router_dir, hint)
    here = draft_identity(draft_dir, engine)
    for key, what in (
        ("hidden_size", "hidden size"),
        ("draft_vocab_size", "draft vocabulary size (logit columns)"),
        ("draft_digest", "draft weights digest"),
    ):
        if config.get(key) != here[key]:
            raise FailedPrecondition(
                f"{router_dir / CONFIG_FILE} was trained for another draft: {what} {config.get(key)!r} "
                f"there, {here[key]!r} for {draft_dir}; retrain with `{hint}`",
                "router",
            )
    if bool(config.get("int8")) != bool(engine.int8_bytes):
        log.warning(
            "router trained on %s draft features, the draft computes in %s: scores shift slightly",
            "int8" if config.get("int8") else "fp32",
            "int8" if engine.int8_bytes else "fp32",
        )
    backend = resolve_backend(backend, "router")
    file = router_dir / (ONNX_FILE if backend == "onnxruntime" else WEIGHTS_FILE)
    if not file.is_file():
        raise FailedPrecondition(f"{file} is missing; retrain with `{hint}`", "router")
    if backend == "onnxruntime":
        score, provider = _onnx_scorer(file)
        log.info("router %s on onnxruntime (%s), threshold %.4f", router_dir, provider, config["threshold"])
    else:
        score = _torch_scorer(file, config["hidden_size"], config["top_k"], config["width"])
        log.info("router %s on torch, threshold %.4f", router_dir, config["threshold"])
    embedding = engine.model.embed_tokens.weight.detach()
    return Router(score, embedding, config["top_k"], float(config["threshold"]), backend)
