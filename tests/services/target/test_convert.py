"""Target-side conversions: Tensor messages with every shape/byte mismatch refused as
INVALID_ARGUMENT naming the field (regressions found by tests/fuzz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.core.errors import InvalidArgument
from services.target.convert import tensor_from_proto
from specmesh.v1 import common_pb2


def test_scalar_shape_holds_one_element() -> None:
    # shape [] with no bytes reached reshape and failed as INTERNAL (RuntimeError)
    with pytest.raises(InvalidArgument) as err:
        tensor_from_proto(common_pb2.Tensor(dtype="float32", shape=[], data=b""), "dense")
    assert err.value.field == "dense.data"
    one = np.array([0.25], np.float32).tobytes()
    t = tensor_from_proto(common_pb2.Tensor(dtype="float32", shape=[], data=one), "dense")
    assert t.shape == () and float(t) == 0.25


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_empty_and_mismatched_shapes(dtype) -> None:
    width = 2 if dtype != "float32" else 4
    for shape, n_bytes in [([], 0), ([0], width), ([3], 2 * width), ([2, 2], 3 * width)]:
        with pytest.raises(InvalidArgument):
            tensor_from_proto(common_pb2.Tensor(dtype=dtype, shape=shape, data=b"\0" * n_bytes), "dense")
    zero = tensor_from_proto(common_pb2.Tensor(dtype=dtype, shape=[0], data=b""), "dense")
    assert zero.shape == (0,) and zero.dtype == torch.float32
