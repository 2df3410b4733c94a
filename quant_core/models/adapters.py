"""Model adapters: which layers of an SD UNet are quantized, which stay float, where time flows.

Two layouts of the same Stable Diffusion UNet are supported:

- ``ldm``: the CompVis / Stability ``UNetModel`` that ComfyUI, A1111, Forge and sgm run
  (``time_embed``, ``input_blocks`` / ``middle_block`` / ``output_blocks``, ``out``; ResBlocks with
  ``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``; SpatialTransformers; SDXL's
  ``label_emb``);
- ``diffusers``: ``UNet2DConditionModel`` (``conv_in``, ``time_proj`` + ``time_embedding``,
  ``down_blocks`` / ``mid_block`` / ``up_blocks``, ``conv_out``; ResnetBlock2D ``time_emb_proj``;
  SDXL's ``add_embedding``).

Adapters describe a model by module names and types only; they never modify it.

SD version detection (``detect_adapter``), first rule that applies:

1. cross-attention context width (``in_features`` of the first ``attn2.to_k``): 768 -> ``sd1``,
   1024 -> ``sd2``, 1280 (SDXL refiner) or 2048 (SDXL base) -> ``sdxl``;
2. otherwise (non-standard widths, e.g. small test models) an SDXL-style extra embedding
   (ldm ``label_emb`` / diffusers ``addition_embed_type == "text_time"``) -> ``sdxl``;
3. otherwise linear transformer projections (``proj_in`` is a Linear, as in SD2.x) -> ``sd2``, else ``sd1``.

So SD2 models that carry a label embedding (unCLIP, the x4 upscaler) stay ``sd2``; their time
embedding is prompt/noise-level dependent, which :meth:`UNetAdapter.emb_depends_only_on_t` reports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

MIN_FEATURES = 16  # layers with fewer input or output features stay float: nothing to gain, only error

LDM = "ldm"
DIFFUSERS = "diffusers"

_BLOCKS = {LDM: ("input_blocks", "middle_block", "output_blocks"),
           DIFFUSERS: ("down_blocks", "mid_block", "up_blocks")}
_LDM_REQUIRED = ("time_embed", "input_blocks", "middle_block", "output_blocks", "out")
_DIFFUSERS_REQUIRED = ("conv_in", "time_proj", "time_embedding", "down_blocks", "up_blocks", "conv_out")
_CONTEXT_VERSIONS = {768: "sd1", 1024: "sd2", 1280: "sdxl", 2048: "sdxl"}
# Module-name fragments of video / motion UNets (SVD, AnimateDiff, ModelScope): their blocks mix
# time across frames, which the per-call timestep model here does not describe.
_VIDEO_MARKERS = ("time_stack", "time_mixer", "motion_modules", "temp_convs", "temp_attentions", "transformer_in")
# Top-level child names that identify diffusion transformers.
_DIT_MARKERS = ("x_embedder", "joint_blocks", "double_blocks", "single_blocks", "transformer_blocks",
                "pos_embed", "context_embedder", "adaln_single", "caption_projection")
# Add-ons that live inside the UNet's modules but are not part of the base model.
_ADDON_MARKERS = (".processor.", ".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.",
                  ".lora_magnitude_vector.")

_SUPPORTED = ("FidelityQuant supports SD1.x / SD2.x / SDXL UNets, in ldm layout (ComfyUI / A1111 / Forge / "
              "sgm UNetModel) or diffusers layout (UNet2DConditionModel)")


def is_linear(module) -> bool:
    """``nn.Linear`` (subclasses included), or a host's linear layer that is a plain module with its attributes
    (Forge's ``ForgeOperations.Linear``: ``in_features``, ``out_features``, a matching 2-D ``weight``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Linear" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "out_features", None), getattr(module, "in_features", None)))


class UnsupportedModelError(ValueError):
    """The model is not a Stable Diffusion UNet that FidelityQuant knows."""


@dataclass(frozen=True)
class UNetAdapter:
    """Names and rules for one UNet layout and SD version. Stateless: every method takes the model it describes."""

    layout: str      # module layout: "ldm" | "diffusers"
    sd_version: str  # "sd1" | "sd2" | "sdxl"

    # ------------------------------------------------------------------ time path

    def time_embedding_name(self, unet: nn.Module) -> str:
        """The MLP applied to the sinusoidal t embedding: ``time_embed`` (ldm) / ``time_embedding`` (diffusers)."""
        return "time_embed" if self.layout == LDM else "time_embedding"

    def time_projection_names(self, unet: nn.Module) -> list[str]:
        """Every ResBlock time projection, in module order.

        ldm: ``<block>.emb_layers`` (Sequential(SiLU, Linear), applied to ``emb``);
        diffusers: ``<block>.time_emb_proj`` (Linear; ResnetBlock2D applies its ``nonlinearity`` first
        unless ``skip_time_act``).
        """
        suffix = ".emb_layers" if self.layout == LDM else ".time_emb_proj"
        return [name for name, module in unet.named_modules() if name.endswith(suffix)]

    def emb_depends_only_on_t(self, unet: nn.Module) -> bool:
        """Whether the embedding the ResBlocks see is a function of t alone.

        False when something prompt- or input-dependent is added to it: ldm ``label_emb`` (SDXL,
        unCLIP, upscaler), diffusers ``add_embedding`` (SDXL) or ``class_embedding``, or a
        diffusers time embedding conditioned on ``timestep_cond`` (``cond_proj``, LCM-distilled UNets).
        Then only the time MLP can be precalculated; the ResBlock projections run every call.
        """
        if self.layout == LDM:
            return getattr(unet, "label_emb", None) is None
        if getattr(unet, "add_embedding", None) is not None or getattr(unet, "class_embedding", None) is not None:
            return False
        return getattr(getattr(unet, "time_embedding", None), "cond_proj", None) is None

    def time_module_names(self, unet: nn.Module) -> list[str]:
        """Modules whose outputs depend on t only: the time MLP, plus the projections when emb does."""
        names = [self.time_embedding_name(unet)]
        if self.emb_depends_only_on_t(unet):
            names += self.time_projection_names(unet)
        return names

    def time_path_linears(self, unet: nn.Module) -> dict[str, nn.Module]:
        """Linears on the time path: quantized like any layer only when time precalculation is off."""
        roots = [self.time_embedding_name(unet)] + self.time_projection_names(unet)
        return {name: module for name, module in unet.named_modules()
                if is_linear(module) and min(module.in_features, module.out_features) >= MIN_FEATURES
                and any(_under(name, root) for root in roots)}

    # ------------------------------------------------------------------ layers

    def float_layers(self, unet: nn.Module) -> dict[str, str]:
        """Every Linear / Conv2d that stays float, with the reason (module order)."""
        return {name: reason for name, (_, reason) in self._classify(unet).items() if reason is not None}

    def quantizable_layers(self, unet: nn.Module) -> dict[str, nn.Module]:
        """Dotted name -> nn.Linear / nn.Conv2d (subclasses included) to quantize, in module order.

        Every Linear / Conv2d in the down / mid / up blocks except the ResBlock time projections,
        grouped or non-zero-padded convs, tiny layers and add-ons (attention processors, LoRA).
        Together with :meth:`float_layers` this covers every Linear / Conv2d of the model exactly once.
        """
        return {name: module for name, (module, reason) in self._classify(unet).items() if reason is None}

    def _classify(self, unet: nn.Module) -> dict:
        blocks = _BLOCKS[self.layout]
        embed = self.time_embedding_name(unet)
        projections = self.time_projection_names(unet)
        projection_reason = (
            "ResBlock time projection: depends on t only, precalculated per timestep (never quantized)"
            if self.emb_depends_only_on_t(unet) else
            "ResBlock time projection: tiny M (one row per sample); its input also depends on the "
            "conditioning embedding, so it runs in float every call")
        out = {}
        for name, module in unet.named_modules():
            if isinstance(module, nn.Conv2d) or is_linear(module):
                if _under(name, embed):
                    reason = "time MLP: depends on t only, precalculated per timestep (never quantized)"
                elif any(_under(name, root) for root in projections):
                    reason = projection_reason
                else:
                    reason = self._float_reason(name, module, blocks)
                out[name] = (module, reason)
        return out

    def _float_reason(self, name: str, module: nn.Module, blocks: tuple) -> str | None:
        top = name.split(".", 1)[0]
        if _under(name, "input_blocks.0.0") or (self.layout == DIFFUSERS and name == "conv_in"):
            return "conv_in: first layer (K = in_channels x 9 is tiny) and error-sensitive"
        if (self.layout == LDM and top == "out") or (self.layout == DIFFUSERS and name == "conv_out"):
            return "conv_out: last layer (N = out_channels is tiny) and error-sensitive"
        if top in ("label_emb", "add_embedding", "add_time_proj", "class_embedding"):
            return "SDXL / class conditioning embedding: tiny M (one row per sample)"
        if top not in blocks:
            return f"outside the UNet blocks ({top})"
        if any(marker in f".{name}." for marker in _ADDON_MARKERS):
            return "add-on (attention processor / LoRA adapter), not part of the base UNet"
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return f"grouped conv (groups={module.groups}): no int8 kernel"
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                return f"padding {module.padding!r} / mode {module.padding_mode!r}: only explicit zero padding"
            if module.in_channels < MIN_FEATURES or module.out_channels < MIN_FEATURES:
                return f"fewer than {MIN_FEATURES} channels"
        elif module.in_features < MIN_FEATURES or module.out_features < MIN_FEATURES:
            return f"fewer than {MIN_FEATURES} features"
        return None

    # ------------------------------------------------------------------ calls

    def timesteps_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The call's model-time timesteps as a (B,) float32 tensor (on the device they came on).

        ldm: ``forward(x, timesteps=None, context=None, y=None, ...)``; diffusers:
        ``forward(sample, timestep, encoder_hidden_states, ...)``. Positional or keyword; a Python
        number, 0-d or one-element tensor is broadcast to the batch of the sample.
        """
        names = ("timesteps", "timestep", "t") if self.layout == LDM else ("timestep", "timesteps", "t")
        t = next((kwargs[k] for k in names if kwargs.get(k) is not None), None)
        if t is None:
            if len(args) < 2 or args[1] is None:
                raise ValueError(f"no timestep in the {self.layout} UNet call (expected args[1] or "
                                 f"keyword {names[0]!r})")
            t = args[1]
        sample = args[0] if args else next((kwargs[k] for k in ("x", "sample") if k in kwargs), None)
        t = torch.as_tensor(t).detach().reshape(-1).to(torch.float32)
        if t.numel() == 1 and isinstance(sample, torch.Tensor) and sample.dim() > 0:
            t = t.expand(sample.shape[0])
        return t


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


# ---------------------------------------------------------------------- detection

def _context_dim(unet: nn.Module) -> int | None:
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") and is_linear(module):
            return module.in_features
    return None


def _linear_projection(unet: nn.Module) -> bool:
    for name, module in unet.named_modules():
        if name.endswith("proj_in"):
            return is_linear(module)
    return False


def _unsupported(unet, why: str = "") -> UnsupportedModelError:
    children = [name for name, _ in unet.named_children()] if isinstance(unet, nn.Module) else []
    shown = ", ".join(children[:16]) + (", ..." if len(children) > 16 else "")
    hint = ""
    if "diffusion_model" in children:
        hint = " (this looks like a wrapper: pass its .diffusion_model)"
    elif hasattr(unet, "unet") and isinstance(getattr(unet, "unet"), nn.Module):
        hint = " (this looks like a pipeline: pass its .unet)"
    elif any(marker in children for marker in _DIT_MARKERS):
        hint = " (this looks like a diffusion transformer such as Flux / SD3 / PixArt, which is not supported)"
    reason = f": {why}" if why else ""
    return UnsupportedModelError(
        f"{type(unet).__name__} is not a supported model{reason}{hint}. Top-level children found: "
        f"[{shown}]. {_SUPPORTED}.")


def detect_adapter(unet: nn.Module) -> UNetAdapter:
    """The adapter for an SD1.x / SD2.x / SDXL UNet; raises :class:`UnsupportedModelError` otherwise."""
    if not isinstance(unet, nn.Module):
        raise _unsupported(unet, "not a torch.nn.Module")
    if all(isinstance(getattr(unet, a, None), nn.Module) for a in _LDM_REQUIRED):
        layout, marker = LDM, getattr(unet, "label_emb", None) is not None
    elif all(isinstance(getattr(unet, a, None), nn.Module) for a in _DIFFUSERS_REQUIRED):
        layout = DIFFUSERS
        config = getattr(unet, "config", None)
        add_type = getattr(config, "addition_embed_type", None) if config is not None else None
        if add_type is None and getattr(unet, "add_embedding", None) is not None:
            add_type = "text_time" if getattr(unet, "add_time_proj", None) is not None else "unknown"
        if add_type not in (None, "text_time"):
            raise _unsupported(unet, f"addition_embed_type={add_type!r} (Kandinsky / IF style), not an SD UNet")
        marker = add_type == "text_time"
        if any(type(m).__name__ == "ResnetBlockCondNorm2D" for m in unet.modules()):
            raise _unsupported(unet, "ResnetBlockCondNorm2D (ada_group / spatial time norm), not an SD UNet")
    else:
        raise _unsupported(unet)
    names = [name for name, _ in unet.named_modules()]
    video = sorted({m for m in _VIDEO_MARKERS for n in names if m in n.split(".")})
    if video:
        raise _unsupported(unet, f"video / motion UNet (found {', '.join(video)} modules)")
    context = _context_dim(unet)
    if context is None:
        raise _unsupported(unet, "no cross-attention (attn2.to_k) found")
    if context in _CONTEXT_VERSIONS:
        sd_version = _CONTEXT_VERSIONS[context]
    elif marker:
        sd_version = "sdxl"
    else:
        sd_version = "sd2" if _linear_projection(unet) else "sd1"
    return UNetAdapter(layout, sd_version)
