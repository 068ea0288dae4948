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
prefill 575 vs 474. Hence the default plan below.

Another CPU can rank the paths the other way round: on a 2-core Xeon with AVX-512, MKL's
W @ x^T for one or two rows cost 40-104 us per SmolLM2 projection against 8-32 us for
F.linear. So the engine measures the paths per weight shape and row bucket at start-up
(kernels.linear_choice) and passes each layer a *plan*, one path per row bucket; the default
plan serves only where nothing was measured.
"""

from __future__ import annotations

import bisect
import warnings

import torch
import torch.nn.functional as F

SMALL_BATCH_ROWS = 16  # default plan: up to this many rows without a packed weight take W @ x^T
PACK_BATCH_HINT = 8  # the row count oneDNN blocks packed weights for (any count still works)
PACKED_MIN_ROWS = 3  # default plan: 1-2 rows take BLAS's W @ x^T even with a packed weight

# The exact (fp32) paths a plan chooses among: F.linear, BLAS's W @ x^T, the oneDNN-packed weight.
PATHS = ("linear", "mm_t", "packed")
# Row buckets of a plan: bucket i holds row counts up to ROW_BUCKETS[i], the last one the rest.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BUCKET_ROWS = (*ROW_BUCKETS, 128)  # the row count each bucket is measured at
Plan = tuple[str, ...]  # one of PATHS per bucket, len(BUCKET_ROWS) entries


def row_bucket(rows: int) -> int:
    return bisect.bisect_left(ROW_BUCKETS, rows)


def default_plan(packed: bool) -> Plan:
    """The measured-on-EPYC thresholds: W @ x^T up to SMALL_BATCH_ROWS rows (the packed weight
    from PACKED_MIN_ROWS up, when there is one), then F.linear (or the packed weight)."""
    plan = []
    for rows in BUCKET_ROWS:
        if packed and rows >= PACKED_MIN_ROWS:
            plan.append("packed")
        else:
            plan.append("mm_t" if rows <= SMALL_BATCH_ROWS else "linear")
    return tuple(plan)


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


def prepare_int4(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ATen CPU int4 kernel's copy of 4-bit grouped weights w = codes * scale + offset
    (codes [N, K] in 0..15, scale and offset [N, K / group]); None where the kernel is missing.

    The kernel computes w = (code - 8) * s + z, so s = scale and z = offset + 8 * scale: the
    same weights. Its fast path takes bf16 activations (fp32 ones ran ~100x slower on the
    Xeon), so the scales are kept in bf16 as well."""
    if codes.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    s = scale.float()
    z = offset.float() + 8 * s
    scales_and_zeros = (
        torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    )  # [K/g, N, 2]
    return packed, scales_and_zeros


def int4_linear(x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], group: int) -> torch.Tensor:
    """x [..., in] (any float dtype) @ W^T with W a prepare_int4() copy; bf16 activations,
    fp32 result."""
    packed, scales_and_zeros = prepared
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scales_and_zeros)
    return out.float().reshape(*x.shape[:-1], out.shape[-1])


def linear_path(path: str, x2: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """x2 [rows, in] @ w^T -> [rows, out] through one of PATHS (`packed` needs the packed copy).

    mm_t gives a single row a duplicate so BLAS takes its matrix-matrix kernel (its
    matrix-vector kernel streamed ~1.5x slower on the EPYC)."""
    if path == "packed":
        return torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")
    if path == "mm_t":
        rows = x2.shape[0]
        xx = torch.cat([x2, x2]) if rows == 1 else x2
        return torch.mm(w, xx.t()).t()[:rows].contiguous()  # [rows, out], row-major like x
    return linear_reference(x2, w)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    packed: torch.Tensor | None = None,
    int8: torch.Tensor | None = None,
    plan: Plan | None = None,
    int4: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T -> [..., out] through the path the plan gives this row count.

    `int4` (the model's own 4-bit weights: prepare_int4's pair and the group size) and `int8`
    (approximate, drafts only) take precedence. Without a plan, default_plan. A plan's
    `packed` falls back to F.linear where the layer has no packed copy.
    """
    if int4 is not None:
        return int4_linear(x, int4[:2], int4[2])
    if int8 is not None:
        return int8_linear(x, int8)
    if x.device.type != "cpu":
        return linear_reference(x, w)
    rows = x.numel() // x.shape[-1]
    path = (plan or default_plan(packed is not None))[row_bucket(rows)]
    if path == "packed" and packed is None:
        path = "linear"
    if path == "linear":
        return linear_reference(x, w)
    out = linear_path(path, x.reshape(rows, x.shape[-1]), w, packed)
    return out.reshape(*x.shape[:-1], w.shape[0])
