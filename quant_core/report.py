"""Human-readable calibration report (also returned as text by the nodes and the CLI)."""
from __future__ import annotations


def format_report(result) -> str:
    """``result``: a :class:`~quant_core.calibration.Calibration`."""
    r = result.report
    lines = [f"FidelityQuant: {r['variant']} {r['family']} UNet, W{result.config.weight_bits}A8"
             f"{' mixed' if result.config.mixed_precision else ''}",
             f"average weight bits {r['average_weight_bits']:.2f} over {len(r['layers'])} layers; "
             f"quantized weights {result.weight_bytes() / 2**20:.1f} MiB",
             f"timestep groups: {len(r['groups'])} over {len(r['timesteps'])} timesteps "
             f"(t ranges: {', '.join(f'{g[0]:.0f}..{g[-1]:.0f}' for g in r['groups'])})",
             f"capture memory {r['capture_bytes'] / 2**20:.1f} MiB; timings: "
             + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())]
    if "fidelity" in r:
        per = r["fidelity"]["unet_rel_error_per_step"]
        lines.append(f"UNet output error vs float (calibration prompts): mean {r['fidelity']['unet_rel_error_mean']:.4f}; "
                     "per step " + " ".join(f"{v:.3f}" for v in per.values()))
    worst = sorted(r["layers"].items(), key=lambda kv: -kv[1]["error"])[:5]
    lines.append("most sensitive layers: " + "; ".join(f"{n} W{v['bits']} err {v['error']:.4f}" for n, v in worst))
    counts = {}
    for bits in r["layers"].values():
        counts[bits["bits"]] = counts.get(bits["bits"], 0) + 1
    if result.config.weight_rounding == "gptq":
        nearest = sum(1 for v in r["layers"].values() if v.get("rounding") == "nearest" and v["bits"] != 16)
        if nearest:
            lines.append(f"error-compensated rounding: {nearest} layers fell back to round-to-nearest (fewer captured "
                         "rows than inputs per row; raise the capture memory limit to cover them)")
    lines.append("precision plan: " + ", ".join(f"{'float' if b == 16 else f'W{b}'} x{c}" for b, c in sorted(counts.items())))
    return "\n".join(lines)
