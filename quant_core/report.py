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
             + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())
             + (f"; sampling passes {r['sampling_passes']}" if "sampling_passes" in r else "")]
    if "fidelity" in r:
        per = r["fidelity"]["unet_rel_error_per_step"]
        where = f" ({r['fidelity']['measured']})" if "measured" in r["fidelity"] else ""
        lines.append(f"UNet output error vs float (calibration prompts{where}): mean "
                     f"{r['fidelity']['unet_rel_error_mean']:.4f}; per step " + " ".join(f"{v:.3f}" for v in per.values()))
    worst = sorted(r["layers"].items(), key=lambda kv: -kv[1]["error"])[:5]
    lines.append("most sensitive layers: " + "; ".join(f"{n} W{v['bits']} err {v['error']:.4f}" for n, v in worst))
    counts = {}
    for bits in r["layers"].values():
        counts[bits["bits"]] = counts.get(bits["bits"], 0) + 1
    if result.config.weight_rounding == "gptq" and not result.config.weight_per_tensor:
        lines += _rounding_lines(r)
    lines.append("precision plan: " + ", ".join(f"{'float' if b == 16 else f'W{b}'} x{c}" for b, c in sorted(counts.items())))
    return "\n".join(lines)


def rounding_coverage(report: dict) -> float:
    """Fraction of quantized layers whose codes came from error-compensated rounding."""
    quantized = [v for v in report["layers"].values() if v["bits"] != 16]
    return sum(v.get("rounding") == "gptq" for v in quantized) / len(quantized) if quantized else 0.0


def _rounding_lines(r: dict) -> list[str]:
    quantized = sum(1 for v in r["layers"].values() if v["bits"] != 16)
    covered = sum(1 for v in r["layers"].values() if v["bits"] != 16 and v.get("rounding") == "gptq")
    gram = r.get("gram")
    how = (f" (Gram blocks of {gram['block']} inputs, {gram['passes']} capture pass"
           f"{'es' if gram['passes'] > 1 else ''})" if gram else "")
    lines = [f"error-compensated rounding on {covered} of {quantized} quantized layers{how}"]
    fallbacks = [(n, v.get("fallback", "fewer captured rows than inputs per row")) for n, v in r["layers"].items()
                 if v["bits"] != 16 and v.get("rounding") == "nearest"]
    if fallbacks:
        shown = "; ".join(f"{n}: {why}" for n, why in fallbacks[:8])
        more = f"; and {len(fallbacks) - 8} more" if len(fallbacks) > 8 else ""
        lines.append(f"rounded to nearest instead: {shown}{more}")
    return lines
