"""Writes a trained router where services/draft/router.py `load_router` finds it.

The ONNX file is exported with torch's `torch.export`-based exporter (`dynamo=True`, which
needs onnxscript): the TorchScript exporter (`dynamo=False`) still works in torch 2.13 but
warns that it will be removed, and it is the only one torch develops. Measured on a loaded
2-core Xeon: 4-6 s for this network, against 1.4 s for the TorchScript one; a one-off cost.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from services.core.routing import RouterNet
from services.draft.router import CONFIG_FILE, FORMAT, INPUT_NAMES, ONNX_FILE, OUTPUT_NAME, WEIGHTS_FILE


class RouterProbabilities(nn.Module):
    """RouterNet with the sigmoid applied: what router.onnx computes (probabilities, so a
    consumer compares them with router.json's threshold directly)."""

    def __init__(self, net: RouterNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, hidden: torch.Tensor, embedding: torch.Tensor, top_logprobs: torch.Tensor
    ) -> torch.Tensor:
        return torch.sigmoid(self.net(hidden, embedding, top_logprobs))  # [n]


def export_onnx(net: RouterNet, path: Path) -> None:
    """router.onnx with a dynamic first (token) dimension on every input and the output."""
    model = RouterProbabilities(net).eval()
    H, k = net.hidden_size, net.top_k
    example = (torch.zeros(2, H), torch.zeros(2, H), torch.zeros(2, k))
    n = torch.export.Dim("n")
    # the exporter narrates its passes on stdout and warns about optional packages: keep the
    # progress bar readable
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                model,
                example,
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes={name: {0: n} for name in INPUT_NAMES},
                dynamo=True,
                external_data=False,  # one file: the weights are about 1.4 MB
            )
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def write_router(out: Path, net: RouterNet, config: dict[str, Any]) -> Path:
    """Write router.onnx, router.safetensors and router.json into `out`, replacing what was
    there only once all three are complete (a service starting meanwhile sees the old router)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    net = net.eval()
    export_onnx(net, tmp / ONNX_FILE)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / WEIGHTS_FILE)
    meta = {"format": FORMAT, "output": f"{OUTPUT_NAME}: probability in [0, 1] per token"} | config
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
