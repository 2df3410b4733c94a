"""How tests/data/fq_v010_*.safetensors were made: run with FidelityQuant 0.1.0 before the quant_core reshape
(commit ffb4a9e), from that checkout's root: ``python tests/data/make_v010_file.py``. Kept for the record;
the current code cannot run it (the old module names are gone), which is the point of the files."""
import sys, torch
sys.path.insert(0, "tests")
sys.path.insert(0, ".")
from unets import tiny_unet, LoopRunner
from quant_core.quantize import quantize
from quant_core.config import preset
from quant_core.artifact import save_result
from safetensors.torch import save_file
unet = tiny_unet("sd1", seed=0)
runner = LoopRunner(unet, prompts=1, steps=3)
res = quantize(unet, runner, preset("W4A8", timestep_groups=2, workers=1, evaluate=False, consistency_pass=True))
save_result(res, "/tmp/fq_v010_tiny_sd1_w4a8.safetensors", overwrite=True)
gen = torch.Generator().manual_seed(123)
x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 64, generator=gen)
model = res.apply(unet)
outs = {}
with torch.no_grad():
    for i, t in enumerate((res.time_keys[0], torch.tensor(321.0))):
        outs[f"out{i}"] = model(x, t, encoder_hidden_states=ctx).sample.contiguous()
outs["x"] = x
outs["ctx"] = ctx
outs["t0"] = res.time_keys[0].reshape(1).clone()
save_file(outs, "/tmp/fq_v010_tiny_sd1_w4a8_expected.safetensors")
print("ok", res.report["layers"].__len__())
