"""kernels.linear: every dispatch path against the F.linear reference, and the dispatch
choosing, per row count, the path the model used before the kernels seam (bit for bit)."""

import pytest
import torch

from kernels.linear import (
    PACKED_MIN_ROWS,
    SMALL_BATCH_ROWS,
    int8_linear,
    linear,
    linear_reference,
    prepare_int8,
    prepare_packed,
)

TOL = 1e-4
ROWS = [1, 2, PACKED_MIN_ROWS, 8, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1, 40]


def operands(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(rows)
    return torch.randn(96, 48), torch.randn(rows, 48)  # w [out, in], x [rows, in]


@pytest.mark.parametrize("rows", ROWS)
def test_paths_match_the_reference(rows: int) -> None:
    w, x = operands(rows)
    ref = torch.nn.functional.linear(x.double(), w.double()).float()
    assert (linear(x, w) - ref).abs().max() <= TOL
    packed = prepare_packed(w)
    if packed is None:
        pytest.skip("oneDNN is not available")
    assert (linear(x, w, packed) - ref).abs().max() <= TOL
    assert linear(x[None], w, packed).shape == (1, rows, 96)  # leading dims kept


@pytest.mark.parametrize("rows", ROWS)
def test_unpacked_dispatch_is_the_old_blas_path(rows: int) -> None:
    """Up to SMALL_BATCH_ROWS rows W @ x^T (one row duplicated), above that F.linear."""
    w, x = operands(rows)
    if rows > SMALL_BATCH_ROWS:
        old = linear_reference(x, w)
    else:
        xx = torch.cat([x, x]) if rows == 1 else x
        old = torch.mm(w, xx.t()).t()[:rows].contiguous()
    assert torch.equal(linear(x, w), old)


@pytest.mark.parametrize("rows", ROWS)
def test_packed_dispatch_serves_three_rows_and_up(rows: int) -> None:
    w, x = operands(rows)
    packed = prepare_packed(w)
    if packed is None:
        pytest.skip("oneDNN is not available")
    got = linear(x, w, packed)
    if rows >= PACKED_MIN_ROWS:
        old = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    else:
        old = linear(x, w)  # 1-2 rows keep the BLAS path
    assert torch.equal(got, old)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_is_close_to_the_reference_and_takes_precedence(rows: int) -> None:
    """int8 weights (per output row) and 8-bit activations: about 1% of the output's scale."""
    w, x = operands(rows)
    x = x[None].expand(2, rows, 48)
    q = prepare_int8(w)
    if q is None:
        pytest.skip("the fbgemm quantized kernels are not available")
    out, ref = int8_linear(x, q), linear_reference(x, w)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
    assert torch.equal(linear(x, w, prepare_packed(w), q), out)


def test_prepared_copies_are_cpu_only() -> None:
    w = torch.randn(8, 4, device="meta")
    assert prepare_packed(w) is None and prepare_int8(w) is None
    assert prepare_packed(torch.randn(8, 4, dtype=torch.float64)) is None
