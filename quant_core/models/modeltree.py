"""Model-tree helpers: clone the module structure without copying weights, swap submodules, fingerprint."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn


def clone_module_tree(module: nn.Module) -> nn.Module:
    """A new module tree that shares every parameter and buffer with ``module``.

    Swapping a submodule (or adding a hook) on the clone leaves the original untouched, and costs
    no weight memory: the user's float model is never modified.
    """
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = module.__dict__.copy()
    for attr in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                 "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks"):
        if attr in module.__dict__:
            new.__dict__[attr] = module.__dict__[attr].copy()
    new.__dict__["_modules"] = {name: None if child is None else clone_module_tree(child)
                                for name, child in module._modules.items()}
    return new


def set_submodule(root: nn.Module, dotted_name: str, module: nn.Module) -> None:
    parent_name, _, child = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if child not in parent._modules:
        raise KeyError(f"{dotted_name} is not a submodule of {type(root).__name__}")
    parent._modules[child] = module


def fingerprint(modules: dict) -> dict:
    """Identity of a base model from the float weights of its quantizable layers.

    Hashes each layer's name, shape and a strided sample of at most 4096 values (cheap even for
    SDXL). The sample is hashed twice, rounded to float16 and to bfloat16, so the same checkpoint
    loaded in fp32, fp16 or bf16 matches while a fine-tune (small weight changes) does not.
    """
    digests = {"fp16": hashlib.sha256(), "bf16": hashlib.sha256()}
    for name in sorted(modules):
        weight = modules[name].weight.detach()
        flat = weight.reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)][:4096].to("cpu")
        for dtype_name, digest in digests.items():
            digest.update(name.encode())
            digest.update(str(tuple(weight.shape)).encode())
            rounded = sample.to(getattr(torch, "float16" if dtype_name == "fp16" else "bfloat16"))
            digest.update(rounded.view(torch.int16).numpy().tobytes())
    return {key: digest.hexdigest()[:32] for key, digest in digests.items()}


def fingerprints_match(a: dict, b: dict) -> bool:
    return any(a.get(key) is not None and a.get(key) == b.get(key) for key in ("fp16", "bf16"))


def weights_digest(module: nn.Module) -> str:
    """Full hash of every parameter and buffer (tests use it to prove a model was not modified)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
