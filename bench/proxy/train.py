"""Train the proxy model (UNet + tiny CLIP text encoder jointly) on the synthetic shapes dataset.

    .venv/bin/python bench/proxy/train.py                    # the committed run (see README.md)
    .venv/bin/python bench/proxy/train.py --steps 50 --out /tmp/p.safetensors --log /tmp/p.log   # smoke

Seeded and single-process: epsilon prediction, DDPM linear beta schedule (1000 steps), uniform t,
classifier-free guidance dropout (caption -> "" with p=0.1), AdamW, linear warmup + cosine decay,
gradient clipping, EMA of the weights (the EMA weights are what is saved, fp32 by default).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# Must be set before torch loads libgomp. On a shared 2-core machine the default (spinning) OpenMP
# workers made a step ~2x slower whenever other processes were running (6.5 s vs 3.1 s measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `proxy` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "proxy"

from .data import make_batch, save_grid  # noqa: E402
from .evaluate import eval_specs, score  # noqa: E402
from .data import caption  # noqa: E402
from .model import (WEIGHTS, build_scheduler_config, build_text_encoder, build_unet, count_params,  # noqa: E402
                    save_proxy, tokenize, train_alphas_cumprod)
from .sample import sample  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--log", default=str(HERE / "train_log.txt"))
    ap.add_argument("--save-dtype", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--eval-cfg", type=float, nargs="+", default=[3.0, 5.0])
    ap.add_argument("--samples", default=str(HERE / "samples.png"),
                    help="grid of eval samples, seed 0 ('' = none; written as .ppm when PIL is missing)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log_f = open(args.log, "w")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    unet = build_unet(args.seed)
    text_encoder = build_text_encoder(args.seed + 1)
    unet.train()
    text_encoder.train()
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    sched = build_scheduler_config()
    alphas_cumprod = train_alphas_cumprod(sched)
    data_gen = torch.Generator().manual_seed(args.seed + 100)
    noise_gen = torch.Generator().manual_seed(args.seed + 200)

    meta = dict(command=" ".join([sys.executable.split("/")[-1]] + sys.argv), args=vars(args),
                unet_params=count_params(unet), text_encoder_params=count_params(text_encoder),
                torch=torch.__version__, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), python=platform.python_version(), threads=torch.get_num_threads(),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    log("# " + json.dumps(meta))
    log("step  loss(avg)  lr  elapsed_s  s_per_step")
    t0 = time.time()
    window = []
    for step in range(args.steps):
        images, captions, _ = make_batch(args.batch_size, data_gen)
        x0 = images * 2 - 1
        drop = torch.rand(args.batch_size, generator=noise_gen) < args.cfg_drop
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        t = torch.randint(0, sched["num_train_timesteps"], (args.batch_size,), generator=noise_gen)
        noise = torch.randn(x0.shape, generator=noise_gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ctx = text_encoder(tokenize(captions)).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)

        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - t0
            log(f"{step + 1:5d}  {sum(window) / len(window):.5f}  {lr_at(step):.2e}  {el:8.1f}  {el / (step + 1):.3f}")
            window = []

    train_s = time.time() - t0
    # buffers (e.g. position_ids) are not EMA'd; copy them so the saved model is complete
    for src, dst in ((unet, ema_unet), (text_encoder, ema_te)):
        for (name, b_src), (_, b_dst) in zip(src.named_buffers(), dst.named_buffers()):
            b_dst.copy_(b_src)
    save_dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
    out = save_proxy(ema_unet, ema_te, args.out, dtype=save_dtype,
                     extra_meta=dict(train_seconds=round(train_s, 1), steps=args.steps, seed=args.seed,
                                     batch_size=args.batch_size))
    log(f"# done: {args.steps} steps in {train_s:.1f} s ({train_s / 60:.1f} min); saved EMA weights ({args.save_dtype}) to {out} "
        f"({Path(out).stat().st_size / 1e6:.2f} MB)")

    # quick evaluation of the saved EMA weights, reloaded from disk
    from .model import load_proxy
    proxy = load_proxy(out)
    held, seen = eval_specs()
    specs = held + seen
    prompts = [caption(*s) for s in specs]
    for cfg, seed in [(c, s) for c in args.eval_cfg for s in (0, 1)]:
        imgs = sample(proxy["unet"], proxy["text_encoder"], tokenize, prompts, seed=seed, cfg=cfg)
        r_held, r_seen = score(imgs[: len(held)], held), score(imgs[len(held):], seen)
        log(f"# eval (DDIM 20 steps, cfg {cfg}) seed {seed}: held-out acc {r_held['accuracy']:.2f} (pos {r_held['position_acc']:.2f}, "
            f"colour {r_held['colour_acc']:.2f}); seen acc {r_seen['accuracy']:.2f} "
            f"(pos {r_seen['position_acc']:.2f}, colour {r_seen['colour_acc']:.2f})")
        if seed == 0 and cfg == args.eval_cfg[-1] and args.samples:
            save_grid(imgs, args.samples, nrow=6, scale=3)
    log_f.close()


if __name__ == "__main__":
    main()
