"""The checkpoint directory format, version 1.

    config.json        {"format": "gpt-checkpoint", "format_version": 1, "dtype": "float32",
                        "model": {GPTConfig fields}, "tokenizer": {"n_vocab": ..., "fingerprint": ...}}
    model.safetensors  the weights, named as GPT's state_dict (lm_head.weight left out when tied)
    tokenizer.json     the tokenizer the model was trained with (tokenizers_bpe format)
    generation.json    optional sampling defaults (a JSON object)
    adapters.safetensors  only for a model with LoRA adapters (gpt.lora): the lora_A/lora_B tensors,
                       described by a "lora" section in config.json ({"rank", "alpha", "targets"});
                       model.safetensors then holds the untouched base weights

Loading validates everything before a weight is used: the format and its version, every tensor
present with the right shape and the recorded dtype, and the tokenizer matching the model's vocabulary
(a tokenizer with more ids than the embedding has rows is the "index out of bounds" crash of other
projects; here it is an error naming both sizes). No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpt.model import GPT, GPTConfig, check_state_shapes
from tools.fileio import atomic_directory
from tools.fileio import read_json as parse_json_file

FORMAT = "gpt-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation.json"
ADAPTERS_FILE = "adapters.safetensors"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, malformed, or inconsistent (a user error)."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise CheckpointError(f"unsupported weight dtype {dtype}; use one of {', '.join(DTYPES)}")


# ---------------------------------------------------------------------------------------------- writing


def write_checkpoint(directory, model: GPT, tokenizer, generation: dict | None = None) -> None:
    """Write the checkpoint files into an existing directory (not atomic: callers wrap it in
    tools.fileio.atomic_directory, as save_pretrained does)."""
    directory = Path(directory)
    config = model.config
    if tokenizer is None:
        raise CheckpointError("a checkpoint needs its tokenizer: pass tokenizer= or set model.tokenizer")
    check_vocab(tokenizer.n_vocab, config.vocab_size, "the tokenizer")
    if generation is not None and not isinstance(generation, dict):
        raise CheckpointError(f"generation defaults must be a dict, got {type(generation).__name__}")
    state = model.state_dict()
    if config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as transformer.wte.weight
    lora_config = getattr(model, "lora_config", None)
    adapters = {}
    if lora_config is not None:
        from gpt.lora import check_unmerged, split_adapters

        check_unmerged(model)
        adapters = split_adapters(state)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"model weights have mixed dtypes {sorted(map(str, dtypes))}; cast the model to one dtype first")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtypes.pop()),
        "model": config.to_dict(),
        "tokenizer": {"n_vocab": tokenizer.n_vocab, "fingerprint": tokenizer.fingerprint()},
    }
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if adapters:
        meta["lora"] = lora_config.to_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(directory / ADAPTERS_FILE), metadata={"format": "pt"})
    tokenizer.save(directory / TOKENIZER_FILE)
    if generation:
        (directory / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_pretrained(directory, model: GPT, tokenizer=None, generation: dict | None = None) -> None:
    """Atomic: the directory appears complete or not at all. An existing one is replaced on success
    if it holds nothing but checkpoint files; one holding other files is a ValueError, left untouched."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    generation = generation if generation is not None else model.generation_config
    with atomic_directory(directory) as tmp:
        write_checkpoint(tmp, model, tokenizer, generation)


# ---------------------------------------------------------------------------------------------- reading
# Each reader raises CheckpointError with a one-line message naming the file; gpt-inspect runs them one
# by one to report every check, load_pretrained runs them all.


def check_vocab(n_vocab: int, vocab_size: int, what: str) -> None:
    if n_vocab != vocab_size:
        raise CheckpointError(
            f"{what} has {n_vocab} tokens but the model's vocab_size is {vocab_size}; "
            "a model must be used with the tokenizer it was built for"
        )


def read_json(path: Path) -> Any:
    try:
        return parse_json_file(path, f"a checkpoint directory needs a valid {path.name}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_meta(directory) -> dict[str, Any]:
    """config.json, validated: returns it with "model" replaced by a GPTConfig."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    path = directory / CONFIG_FILE
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} config (missing \"format\": \"{FORMAT}\"); is this a Hugging Face directory? use gpt-convert hf-import")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format_version {version!r}; this version of the toolkit reads version {FORMAT_VERSION}")
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {meta.get('dtype')!r}")
    try:
        config = GPTConfig.from_dict(meta.get("model"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    missing = [f for f in GPTConfig.__dataclass_fields__ if f not in meta["model"]]
    if missing:
        raise CheckpointError(f"{path}: model config lacks {', '.join(missing)}")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("n_vocab"), int) or not isinstance(tok.get("fingerprint"), str):
        raise CheckpointError(f"{path}: \"tokenizer\" must record n_vocab and fingerprint")
    if "lora" in meta:
        from gpt.lora import LoRAConfig

        try:
            meta["lora"] = LoRAConfig.from_dict(meta["lora"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return {**meta, "model": config}


def check_weights(directory, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every expected tensor present, none extra, right shape and the recorded dtype (header only)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; a checkpoint directory needs {WEIGHTS_FILE}")
    with torch.device("meta"):
        expected = GPT(meta["model"]).state_dict_shapes()
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {}
            for name in f.keys():
                sl = f.get_slice(name)
                found[name] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        check_state_shapes(expected, {k: shape for k, (shape, _) in found.items()}, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for name, (_, dtype) in found.items():
        if dtype != meta["dtype"]:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, but {CONFIG_FILE} records {meta['dtype']}")
    return expected


def load_tokenizer(directory, meta: dict[str, Any]):
    import tokenizers_bpe

    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; a checkpoint directory needs {TOKENIZER_FILE}")
    try:
        tokenizer = tokenizers_bpe.load(path)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_vocab(tokenizer.n_vocab, meta["model"].vocab_size, str(path))
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise CheckpointError(f"{path}: not the tokenizer this model was saved with (fingerprint differs from {CONFIG_FILE})")
    return tokenizer


def read_generation(directory) -> dict[str, Any]:
    path = Path(directory) / GENERATION_FILE
    if not path.exists():
        return {}
    generation = read_json(path)
    if not isinstance(generation, dict):
        raise CheckpointError(f"{path}: must be a JSON object of sampling defaults")
    return generation


def load_adapters(directory, model: GPT, meta: dict[str, Any], device) -> None:
    """Wrap the model's target layers in LoRA (``meta["lora"]``) and load adapters.safetensors."""
    from gpt.lora import adapter_shapes, apply_lora

    path = Path(directory) / ADAPTERS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; {CONFIG_FILE} has a \"lora\" section, so the adapters are needed")
    try:
        adapters = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    apply_lora(model, meta["lora"])
    try:
        check_state_shapes(adapter_shapes(model), {k: tuple(v.shape) for k, v in adapters.items()}, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for name, tensor in adapters.items():
        if dtype_name(tensor.dtype) != meta["dtype"]:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype_name(tensor.dtype)}, but {CONFIG_FILE} records {meta['dtype']}")
    model.load_state_dict(adapters, strict=False)


def load_pretrained(directory, *, device="cpu", dtype: torch.dtype | str | None = None, backend: str | None = None) -> GPT:
    directory = Path(directory)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    meta = read_meta(directory)
    if backend is not None:
        meta["model"].backend = backend
        meta["model"].validate()
    check_weights(directory, meta)
    tokenizer = load_tokenizer(directory, meta)
    generation = read_generation(directory)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    model = GPT.from_state_dict(meta["model"], state, what=str(directory / WEIGHTS_FILE))
    if "lora" in meta:
        load_adapters(directory, model, meta, device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model.tokenizer = tokenizer
    model.generation_config = generation
    return model.eval()  # as transformers does; the trainer calls model.train()
