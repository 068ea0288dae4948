"""Projection matmul y = x @ W^T (no bias): dispatch over prepared weight copies.

The model calls :func:`linear` with a row-major weight and whatever :func:`prepare_packed`
or :func:`prepare_int8` made of it; which implementation runs is decided here, never in the
model. :func:`linear_reference` (``F.linear``) is the pure-torch reference every path is
tested against.

Decode and verification multiply a few rows by every weight, which is bound by streaming the
weights from memory, so the cost should not grow with the row count. Measured on a 2-core EPYC
with SmolLM2's 30 layers of matrices (400 MB): with the weight packed by oneDNN, 1-16 rows cost
17-27 ms; with BLAS as W @ x^T, 1-2 rows cost ~18 ms but 8 rows 37-39 ms and 12 rows ~60 ms;
x @ W^T is slower still. Whole target forwards: decode 28-33 ms (BLAS) vs 35-36 (packed); 8
tokens 57-59 vs 40-41; 12 tokens 97-99 vs 45; and past 16 rows, where F.linear took over, the
packed weight stays ahead: 17 tokens 98 ms (F.linear) vs 53, 32 tokens 131 vs 74, a 256-token
prefill 575 vs 474. Hence the thresholds below.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

SMALL_BATCH_ROWS = 16  # up to this many rows without a packed weight take BLAS's W @ x^T
PACK_BATCH_HINT = 8  # the row count oneDNN blocks packed weights for (any count still works)
PACKED_MIN_ROWS = 3  # 1-2 rows stream faster through BLAS than through the packed weight


def linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T -> [..., out]: the reference (and the non-CPU path)."""
    return F.linear(x, w)


def prepare_packed(w: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-blocked copy of a CPU fp32 weight [out, in], exact, or None where oneDNN is
    unavailable (other devices and dtypes keep the BLAS paths)."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_BATCH_HINT)


def prepare_int8(w: torch.Tensor) -> torch.Tensor | None:
    """An fbgemm-prepacked int8 copy of a CPU weight [out, in]: symmetric, one scale per output
    row (max |w| / 127). None where the quantized CPU kernels are missing.

    For drafts only. A draft's tokens and the distribution it reports come from the same
    quantized forward, so verification stays lossless; only agreement could move. Measured on
    the H200-trained SmolLM2 draft (4 layers, 16k head) against fp32, 2-core EPYC: one draft
    token 5.7-6.2 ms -> 3.6-3.8 ms, a tree level of 8 nodes 7.8-9.7 ms -> 4.3-4.7 ms; the
    quantized draft's greedy choice equals the fp32 draft's on 91% of 1,200 code tokens and
    agrees with the target as often (37.9% vs 37.7%)."""
    if w.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 flags the quantized tensor type as deprecated
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def int8_linear(x: torch.Tensor, prepacked: torch.Tensor) -> torch.Tensor:
    """x @ W^T with W a prepare_int8() copy; x is quantized per call to 8 bits over its whole
    tensor (fbgemm's dynamic quantization). reduce_range=False: the full 8 bits, which
    VNNI / AVX-512 kernels accumulate without the int16 overflow older AVX2 ones risk."""
    return torch.ops.quantized.linear_dynamic(x, prepacked, False)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    packed: torch.Tensor | None = None,
    int8: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T -> [..., out] through the fastest prepared path.

    `int8` (approximate, drafts only) takes precedence; `packed` serves every row count from
    PACKED_MIN_ROWS up; otherwise W @ x^T serves up to SMALL_BATCH_ROWS rows (a single row gets
    a duplicate so BLAS takes its matrix-matrix kernel: its matrix-vector kernel streams ~1.5x
    slower) and F.linear the rest.
    """
    if int8 is not None:
        return int8_linear(x, int8)
    if x.device.type != "cpu":
        return linear_reference(x, w)
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])  # [rows, in]
    if packed is not None and rows >= PACKED_MIN_ROWS:
        out = torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")
    elif rows > SMALL_BATCH_ROWS:
        return linear_reference(x, w)
    else:
        if rows == 1:
            x2 = torch.cat([x2, x2])
        out = torch.mm(w, x2.t()).t()[:rows].contiguous()  # [rows, out], row-major like x
    return out.reshape(*x.shape[:-1], w.shape[0])
