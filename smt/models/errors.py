"""The error of every checkpoint reader (:mod:`smt.models.loading`, :mod:`smt.models.layouts`,
:mod:`smt.models.detect`), in a module of its own so that they can import it without importing each other."""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model, with the differing keys named."""
