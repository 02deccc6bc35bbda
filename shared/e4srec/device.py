"""Device selection shared by every training stage."""

from __future__ import annotations

import torch

from e4srec.errors import E4SRecError


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a cuda request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise E4SRecError(f"device={name!r}: this torch has no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise E4SRecError(f"device={name!r}: expected cpu, cuda, cuda:N or auto") from None
