"""FidelityQuant proxy model: a small trained text-to-image pixel diffusion model (see README.md)."""
from .data import COLOURS, SHAPES, POSITIONS, SIZES, BACKGROUNDS, HELD_OUT, make_batch, caption  # noqa: F401
from .model import (VOCAB, MAX_LEN, build_unet, build_text_encoder, build_scheduler_config, tokenize,  # noqa: F401
                    load_proxy, save_proxy, WEIGHTS)
from .sample import sample, encode_prompts  # noqa: F401
