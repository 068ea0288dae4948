"""Choosing and opening the runtime of a small exported network (the draft's token router, the
scoring service's learned detector): onnxruntime when it is installed, torch otherwise.

onnxruntime takes the CUDA provider when `onnxruntime-gpu` provides one, else the CPU one, with
one intra-op thread: these networks are small MLPs per token, and more threads would only
contend with the engine thread's torch team for the same cores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "torch")


def resolve_backend(backend: str, what: str) -> str:
    """The backend to use for a requested one: "onnxruntime" or "torch" as asked, and for "auto"
    onnxruntime when it is importable, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.info("onnxruntime is not installed: the %s runs on torch", what)
        return "torch"
    return "onnxruntime"


def inference_session(path: Path) -> tuple[Any, str]:
    """An onnxruntime session for the file and the provider it runs on."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=providers)
    return session, session.get_providers()[0]
