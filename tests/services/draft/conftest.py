"""The draft engine a router is trained for, as the draft service serves it (the router itself is
tests/conftest.py's `trained_router`, shared with the r2r integration tests)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def served_draft(trained_router):
    """The slice draft's engine as the draft service prepares it."""
    from services.draft.training.router_labels import load_served_draft

    return load_served_draft(trained_router.draft_dir)
