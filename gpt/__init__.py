"""The GPT-2 model, its checkpoints, the trainer, the sampler and fine-tuning.

Public names are loaded lazily so that ``import gpt`` stays cheap and light commands (``--help``)
start fast."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GPTConfig": "gpt.model",
    "GPT": "gpt.model",
    "KVCache": "gpt.model",
    "PRESETS": "gpt.model",
    "generate": "gpt.sampling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
