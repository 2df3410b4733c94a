"""Model-family adapters: which layers of a UNet are quantized, which stay float, where time flows.

Two layouts of the same Stable Diffusion UNet are supported:

- ``ldm``: the original CompVis / Stability ``UNetModel`` that ComfyUI, A1111 and Forge run
  (``time_embed``, ``input_blocks`` / ``middle_block`` / ``output_blocks``, ResBlocks with
  ``emb_layers``, SpatialTransformers, SDXL's ``label_emb``);
- ``diffusers``: ``UNet2DConditionModel`` (``time_embedding``, ``down_blocks`` / ``mid_block`` /
  ``up_blocks``, ResnetBlock2D ``time_emb_proj``, SDXL's ``add_embedding``).

Adapters only describe a model by module names and types; they never modify it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

MIN_FEATURES = 16  # smaller layers (tiny GEMMs) stay float: no speed to gain, only error


class UnsupportedModelError(ValueError):
    """The model is not a Stable Diffusion UNet that FidelityQuant knows."""


@dataclass(frozen=True)
class UNetAdapter:
    family: str   # "ldm" | "diffusers"
    variant: str  # "sd1" | "sd2" | "sdxl"

    # ------------------------------------------------------------ names

    @property
    def time_embedding_name(self) -> str:
        return "time_embed" if self.family == "ldm" else "time_embedding"

    def time_projection_names(self, unet: nn.Module) -> list:
        """Every ResBlock time projection: ldm ``*.emb_layers`` (SiLU + Linear), diffusers ``*.time_emb_proj``."""
        suffix = ".emb_layers" if self.family == "ldm" else ".time_emb_proj"
        return [name for name, module in unet.named_modules() if name.endswith(suffix) and module is not None]

    def _float_prefixes(self) -> tuple:
        if self.family == "ldm":
            return ("time_embed", "label_emb", "input_blocks.0.0", "out")
        return ("time_embedding", "time_proj", "add_embedding", "add_time_proj", "class_embedding",
                "encoder_hid_proj", "conv_in", "conv_out")

    def emb_depends_only_on_t(self, unet: nn.Module) -> bool:
        """False when prompt-dependent terms are added to the time embedding (SDXL label/add embeddings)."""
        if self.family == "ldm":
            return getattr(unet, "label_emb", None) is None
        return getattr(unet, "add_embedding", None) is None and getattr(unet, "class_embedding", None) is None

    # ------------------------------------------------------------ layers

    def float_layers(self, unet: nn.Module) -> dict:
        """Linear / Conv2d layers kept in float, with the reason."""
        kept = {}
        time_proj = tuple(self.time_projection_names(unet))
        for name, module in unet.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            reason = _float_reason(name, module, self._float_prefixes(), time_proj)
            if reason:
                kept[name] = reason
        return kept

    def quantizable_layers(self, unet: nn.Module) -> dict:
        """Dotted name -> nn.Linear / nn.Conv2d for every layer that gets quantized, in module order."""
        kept = self.float_layers(unet)
        return {name: module for name, module in unet.named_modules()
                if isinstance(module, (nn.Linear, nn.Conv2d)) and name not in kept}

    def time_modules(self, unet: nn.Module) -> dict:
        """Modules on the time path whose outputs depend on t only (precalculated into tables)."""
        modules = {self.time_embedding_name: unet.get_submodule(self.time_embedding_name)}
        if self.emb_depends_only_on_t(unet):
            modules.update({name: unet.get_submodule(name) for name in self.time_projection_names(unet)})
        return modules

    def time_path_linears(self, unet: nn.Module) -> dict:
        """Every Linear on the time path (quantized only when time precalculation is switched off)."""
        found = {}
        for prefix in [self.time_embedding_name] + self.time_projection_names(unet):
            root = unet.get_submodule(prefix)
            for sub, module in root.named_modules():
                if isinstance(module, nn.Linear) and module.in_features >= MIN_FEATURES:
                    found[f"{prefix}.{sub}" if sub else prefix] = module
        return found

    # ------------------------------------------------------------ calls

    def timesteps_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The (B,) float timesteps of a UNet forward call, from positional or keyword arguments."""
        key = "timesteps" if self.family == "ldm" else "timestep"
        t = kwargs.get(key, kwargs.get("t"))
        if t is None:
            if len(args) < 2:
                raise ValueError(f"could not find the timestep argument ({key!r}) in the UNet call")
            t = args[1]
        sample = args[0] if args else kwargs.get("x", kwargs.get("sample"))
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        if t.numel() == 1 and sample is not None:
            t = t.expand(sample.shape[0])
        return t.float()


def _float_reason(name: str, module: nn.Module, prefixes: tuple, time_proj: tuple) -> str | None:
    if any(name == p or name.startswith(p + ".") for p in prefixes):
        return "time path / input-output layer / conditioning embedding"
    if any(name == tp or name.startswith(tp + ".") for tp in time_proj):
        return "time path (ResBlock time projection)"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "grouped conv or non-zero padding mode"
        if module.in_channels < MIN_FEATURES or module.out_channels < MIN_FEATURES:
            return f"fewer than {MIN_FEATURES} channels"
    elif module.in_features < MIN_FEATURES or module.out_features < MIN_FEATURES:
        return f"fewer than {MIN_FEATURES} features"
    return None


def _context_dim(unet: nn.Module) -> int | None:
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    return None


def _linear_projection(unet: nn.Module) -> bool:
    for name, module in unet.named_modules():
        if name.endswith("proj_in"):
            return isinstance(module, nn.Linear)
    return False


def _variant(unet: nn.Module, sdxl_marker: bool) -> str:
    """SDXL has label_emb / add_embedding (or 2048-d context); SD2.x has 1024-d context and
    linear transformer projections (SD1.x: 768-d context, 1x1-conv projections)."""
    if sdxl_marker:
        return "sdxl"
    context = _context_dim(unet)
    if context == 2048:
        return "sdxl"
    if context == 1024 or _linear_projection(unet):
        return "sd2"
    return "sd1"


def detect_adapter(unet: nn.Module) -> UNetAdapter:
    """The adapter for an SD UNet; raises UnsupportedModelError naming what was found otherwise."""
    children = [name for name, _ in unet.named_children()]
    if all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks", "time_embed")):
        return UNetAdapter("ldm", _variant(unet, getattr(unet, "label_emb", None) is not None))
    if all(hasattr(unet, a) for a in ("down_blocks", "up_blocks", "time_embedding", "conv_in")):
        sdxl = getattr(unet, "add_embedding", None) is not None
        return UNetAdapter("diffusers", _variant(unet, sdxl))
    raise UnsupportedModelError(
        f"FidelityQuant supports Stable Diffusion 1.x / 2.x / XL UNets (ldm layout as in ComfyUI and A1111, "
        f"or diffusers UNet2DConditionModel); got {type(unet).__name__} with top-level modules "
        f"{children[:12]}{' ...' if len(children) > 12 else ''}. Transformer models (Flux, SD3, PixArt) "
        "are not supported.")
