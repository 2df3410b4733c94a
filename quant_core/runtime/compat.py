"""Torch-version shims for the runtime (the hosts ship different torch versions: A1111 v1.10 has 2.1.2)."""
from __future__ import annotations

import torch

_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3


def is_compiling() -> bool:
    """``torch.compiler.is_compiling()``; on older torch, dynamo's own flag (False when dynamo is absent)."""
    if _IS_COMPILING is not None:
        return bool(_IS_COMPILING())
    try:
        from torch._dynamo import is_compiling as dynamo_is_compiling
    except ImportError:
        return False
    return bool(dynamo_is_compiling())
