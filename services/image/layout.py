"""How image tokens, class tokens and the token grid share one AR vocabulary.

ids [0, K) are VQ codes, K + c is digit class c, K + 10 the null class that classifier-free
guidance conditions on. A sequence is [class token, code_0, ..., code_63] in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.errors import InvalidArgument

NUM_CLASSES = 10


@dataclass(frozen=True)
class Layout:
    codebook_size: int  # K
    grid: int = 8  # side of the token grid

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + NUM_CLASSES + 1

    @property
    def null_class(self) -> int:
        return self.codebook_size + NUM_CLASSES

    def class_token(self, label: int, field: str = "class_label") -> int:
        if not 0 <= label < NUM_CLASSES:
            raise InvalidArgument(f"class {label} is not a digit class (0..{NUM_CLASSES - 1})", field)
        return self.codebook_size + label
