"""4-bit weight groups as the published GGUF stores them (Q4_1), and their file in the store.

Q4_1 (llama.cpp's ggml) splits each weight row into groups of 32 consecutive input columns;
group g of row n stores 4-bit codes q in 0..15, an fp16 scale d and an fp16 offset m, and
the weight is q * d + m. The fp32 weights of the model store are exactly that dequantization
(computed in fp32), so serving the codes with their own scales and offsets serves the same
weights, 4.5 bits each instead of 32.

The store keeps them in `q4_1.safetensors`, next to the fp32 weights: per HF weight name,
`<name>.codes` uint8 [N, K/2] (two codes per byte, even column in the low nibble), `<name>.scale`
and `<name>.offset` fp16 [N, K/32].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from services.core.errors import InvalidArgument

GROUP = 32  # Q4_1's group size
Q4_FILE = "q4_1.safetensors"


@dataclass
class Q4Groups:
    codes: torch.Tensor  # [N, K] uint8, 0..15
    scale: torch.Tensor  # [N, K / GROUP] fp16
    offset: torch.Tensor  # [N, K / GROUP] fp16

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32: codes * scale + offset, computed in fp32 as llama.cpp's reference does."""
        N, K = self.codes.shape
        q = self.codes.view(N, K // GROUP, GROUP).float()
        return (q * self.scale.float()[..., None] + self.offset.float()[..., None]).view(N, K)

    @staticmethod
    def cat(parts: list[Q4Groups]) -> Q4Groups:
        """Stack along the rows (fused q/k/v and gate/up projections)."""
        return Q4Groups(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "offset")))


def q4_1_from_blocks(blocks: torch.Tensor, rows: int, cols: int) -> Q4Groups:
    """GGUF Q4_1 data (any shape, uint8, 20 bytes per group: fp16 d, fp16 m, 16 bytes of codes
    with element j in the low nibble and j + 16 in the high nibble of byte j) -> Q4Groups."""
    if cols % GROUP:
        raise InvalidArgument(f"a Q4_1 row of {cols} columns is not a whole number of groups", "tensors")
    b = blocks.reshape(-1, 20)
    if b.shape[0] != rows * cols // GROUP:
        raise InvalidArgument(
            f"Q4_1 data holds {b.shape[0]} groups, expected {rows * cols // GROUP}", "tensors"
        )
    d = b[:, 0:2].contiguous().view(torch.float16).view(rows, cols // GROUP)
    m = b[:, 2:4].contiguous().view(torch.float16).view(rows, cols // GROUP)
    qs = b[:, 4:20]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=1).view(rows, cols)  # [groups, 32] -> [N, K]
    return Q4Groups(codes.contiguous(), d.clone(), m.clone())


def save_q4(path: Path, groups: dict[str, Q4Groups]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, g in groups.items():
        tensors[f"{name}.codes"] = (g.codes[:, 0::2] | (g.codes[:, 1::2] << 4)).contiguous()
        tensors[f"{name}.scale"] = g.scale.contiguous()
        tensors[f"{name}.offset"] = g.offset.contiguous()
    save_file(tensors, str(path), metadata={"format": "specmesh-q4_1", "group_size": str(GROUP)})


def load_q4(path: Path) -> dict[str, Q4Groups]:
    from safetensors import safe_open

    if not path.is_file():
        raise InvalidArgument(
            f"{path.parent.name} has no 4-bit weights ({path.name}): only models imported from a Q4_1 "
            "GGUF have them; re-import with `specmesh models import smollm2 --force` if an older "
            "specmesh imported it",
            "weights",
        )
    out: dict[str, Q4Groups] = {}
    with safe_open(str(path), framework="pt") as f:
        names = {k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        for name in sorted(names):
            packed = f.get_tensor(f"{name}.codes")
            codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)
            out[name] = Q4Groups(
                codes.contiguous(), f.get_tensor(f"{name}.scale"), f.get_tensor(f"{name}.offset")
            )
    return out
