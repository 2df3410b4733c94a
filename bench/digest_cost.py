"""What the integrity digest costs on a full-size file (issue 15): a W8A8 file with the SD1.5 UNet's
quantizable layers (int8 weights of the real shapes, random codes and scales; no calibration needed,
the digest only reads bytes). Times the save, the load, and the hashing alone within the load.

    OMP_NUM_THREADS=1 .venv/bin/python bench/digest_cost.py [--variant sd1] [--out /tmp/fq_digest.safetensors]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_core import artifact  # noqa: E402
from quant_core.calibration import Calibration, LayerState  # noqa: E402
from quant_core.config import preset  # noqa: E402
from quant_core.integrity import digest_of  # noqa: E402
from quant_core.models.adapters import detect_adapter  # noqa: E402
from quant_core.runtime.layers import QuantConv2d, QuantLinear  # noqa: E402


def full_size_calibration(variant: str) -> Calibration:
    from bench.tiny_models import SD_CONTEXT
    from diffusers import UNet2DConditionModel

    kwargs = {"cross_attention_dim": SD_CONTEXT[variant]}
    if variant == "sd2":
        kwargs.update(attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**kwargs)  # the SD1.5 / SD2 layout at full width, no weight memory
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in detect_adapter(unet).quantizable_layers(unet).items():
        if isinstance(module, torch.nn.Linear):
            layer = QuantLinear(module.in_features, module.out_features, module.bias is not None, 8, act_groups=4)
        else:
            layer = QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                module.padding, module.dilation, module.bias is not None, 8, act_groups=4)
        for key, tensor in layer.state_dict().items():
            if tensor.dtype == torch.int8:
                tensor.copy_(torch.randint(-127, 128, tensor.shape, generator=gen, dtype=torch.int8))
            else:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.01)
        layers[name] = LayerState.of(layer)
    return Calibration("diffusers", variant, preset("W8A8"), {"fp16": "0", "bf16": "0"}, layers,
                       [[999.0], [749.0], [499.0], [249.0]], None, {}, {n: 8 for n in layers},
                       {"layers": {}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd1", choices=["sd1", "sd2"])
    parser.add_argument("--out", default="/tmp/fq_digest_cost.safetensors")
    args = parser.parse_args()
    calibration = full_size_calibration(args.variant)
    if os.path.exists(args.out):
        os.remove(args.out)
    start = time.perf_counter()
    artifact.save_result(calibration, args.out)
    save_s = time.perf_counter() - start
    size = os.path.getsize(args.out)
    os.system(f"cat {args.out} > /dev/null")  # warm the page cache: time the work, not the disk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        loaded = artifact.load_result(args.out)
        load_s = time.perf_counter() - start
    tensors = {f"layer.{n}.{k}": t for n, s in loaded.layers.items() for k, t in s.tensors.items()}
    start = time.perf_counter()
    digest_of({}, tensors)
    hash_s = time.perf_counter() - start
    print(f"{args.variant} W8A8: {len(loaded.layers)} layers, file {size / 2**20:.0f} MiB; save {save_s:.2f}s, "
          f"load {load_s:.2f}s of which the digest {hash_s:.2f}s ({size / 2**20 / hash_s:.0f} MiB/s, "
          f"{100 * hash_s / load_s:.0f}% of the load)")
    os.remove(args.out)


if __name__ == "__main__":
    main()
