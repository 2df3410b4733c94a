"""Integrity digest of a saved file: SHA-256 over its metadata and the bytes of every tensor.

safetensors validates a file's header, not its data: a flipped byte in a weight or a scale loads
silently. The digest is stored in the metadata under ``DIGEST_KEY`` and recomputed at load over what
was actually read, so any change to the data or to another metadata value is refused. It guards
against damage (bad copies, truncated downloads, disk errors), not against someone who rewrites the
digest too: the structural checks in ``artifact.py`` cover such files.

Canonical form (stable across safetensors versions, independent of the on-disk tensor order): every
metadata entry except the digest, sorted by key, then every tensor sorted by name, each field length-
prefixed so that no two different files hash the same stream.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

DIGEST_KEY = "digest"
ALGORITHM = "sha256"


def _field(h, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def tensor_bytes(tensor: torch.Tensor):
    """The tensor's raw little-endian bytes as a buffer (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


class Digest:
    """Fed the metadata once and then the tensors in any order; ``hexdigest`` sorts the tensors' parts."""

    def __init__(self, metadata: dict) -> None:
        self._meta = hashlib.new(ALGORITHM)
        for key in sorted(metadata):
            if key != DIGEST_KEY:
                _field(self._meta, key.encode())
                _field(self._meta, str(metadata[key]).encode())
        self._tensors: dict = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = _tensor_digest(name, tensor)

    def add_all(self, tensors: dict) -> None:
        """Hash many tensors on several threads: hashlib releases the GIL on large buffers, and the
        tensors' digests are independent (combined in name order)."""
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for name, digest in zip(tensors, pool.map(_tensor_digest, tensors, tensors.values())):
                self._tensors[name] = digest

    def hexdigest(self) -> str:
        h = self._meta.copy()
        for name in sorted(self._tensors):
            h.update(self._tensors[name])
        return f"{ALGORITHM}:{h.hexdigest()}"


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    h = hashlib.new(ALGORITHM)
    _field(h, name.encode())
    _field(h, str(tensor.dtype).encode())
    _field(h, repr(tuple(tensor.shape)).encode())
    data = tensor_bytes(tensor)
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
    return h.digest()


def digest_of(metadata: dict, tensors: dict) -> str:
    digest = Digest(metadata)
    digest.add_all(tensors)
    return digest.hexdigest()
