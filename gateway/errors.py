"""Errors the gateway raises itself."""

from __future__ import annotations

from services.core.errors import SpecmeshError


class UpstreamError(SpecmeshError):
    """An upstream service answered something that breaks the protocol."""

    code = "INTERNAL"
