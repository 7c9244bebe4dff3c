"""The GPT-2 model, its checkpoints, the trainer, the sampler and fine-tuning.

    import gpt
    model = gpt.GPT.from_pretrained("runs/x/final")
    ids = model.tokenizer.encode_ordinary("ROMEO:")
    out = gpt.generate(model, ids, 50, temperature=0.8, top_k=40, seed=1)  # compile=True: faster for long outputs
    print(model.tokenizer.decode(ids + out[0]))
"""

from gpt.config import PRESETS, GPTConfig
from gpt.model import GPT, KVCache
from gpt.quantize import quantize
from gpt.sampling import generate

__all__ = ["GPTConfig", "GPT", "KVCache", "PRESETS", "generate", "quantize"]
