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

import contextlib
import json
import os
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tokenizers_bpe
from gpt.config import GPTConfig
from gpt.device import DTYPES, dtype_name
from gpt.lora import LoRAConfig, adapter_shapes, apply_lora, check_unmerged, split_adapters
from gpt.memory import check_model_fits
from gpt.token_choice import MAX_NEW_TOKENS, SAMPLING_DEFAULTS, check_count, check_sampling_settings
from tokenizers_bpe import TOKENIZER_FILE
from tokenizers_bpe.errors import InputFileError, SettingError, is_unicode
from tokenizers_bpe.fileio import Stamp, atomic_directory, check_directory, check_regular_file, format_stamp, recorded_version
from tokenizers_bpe.fileio import read_json as parse_json_file

FORMAT = "gpt-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation.json"
ADAPTERS_FILE = "adapters.safetensors"

CHECKPOINT_STAMP = Stamp(FORMAT, "a checkpoint", CONFIG_FILE)
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, malformed, or inconsistent (a user error)."""


# ---------------------------------------------------------------------------------------------- writing


def write_checkpoint(directory, model, tokenizer, generation: dict | None = None) -> None:
    """Write the checkpoint files into an existing directory (not atomic: callers wrap it in
    tokenizers_bpe.fileio.atomic_directory, as save_pretrained does)."""
    directory = Path(directory)
    config = model.config
    if tokenizer is None:
        raise CheckpointError("a checkpoint needs its tokenizer: pass tokenizer= or set model.tokenizer")
    check_vocab(tokenizer.n_vocab, config.vocab_size, "the tokenizer")
    if getattr(model, "quantization", None) is not None:
        raise CheckpointError("a quantized model cannot be saved (checkpoints hold float weights); "
                              "save the model before gpt.quantize, and quantize it again after loading")
    if generation is not None and not isinstance(generation, dict):
        raise CheckpointError(f"generation defaults must be a dict, got {type(generation).__name__}")
    state = model.state_dict()
    if config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as transformer.wte.weight
    lora_config = getattr(model, "lora_config", None)
    adapters = {}
    if lora_config is not None:
        check_unmerged(model)
        adapters = split_adapters(state)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"model weights have mixed dtypes {sorted(map(str, dtypes))}; cast the model to one dtype first")
    try:
        dtype = dtype_name(dtypes.pop())
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    meta = {
        **format_stamp(FORMAT, FORMAT_VERSION),
        "dtype": dtype,
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


def save_pretrained(directory, model, tokenizer=None, generation: dict | None = None) -> None:
    """Atomic: the directory appears complete or not at all. An existing one is replaced on success
    if it holds nothing but checkpoint files; one holding other files is a ValueError, left untouched."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    generation = generation if generation is not None else model.generation_config
    with atomic_directory(directory, CHECKPOINT_STAMP) as tmp:
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
    try:
        directory = check_directory(directory, "checkpoint directory")
    except InputFileError as e:
        raise CheckpointError(str(e)) from None
    path = directory / CONFIG_FILE
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} config (missing \"format\": \"{FORMAT}\"); is this a Hugging Face directory? use gpt-convert hf-import")
    version = recorded_version(meta)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format_version {reprlib.repr(version)}; this version of the toolkit reads version {FORMAT_VERSION}")
    if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {meta.get('dtype')!r}")
    try:
        config = GPTConfig.from_dict(meta.get("model"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    missing = [f for f in GPTConfig.__dataclass_fields__ if f not in meta["model"]]
    if missing:
        raise CheckpointError(f"{path}: model config lacks {', '.join(missing)}")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or type(tok.get("n_vocab")) is not int or not isinstance(tok.get("fingerprint"), str):
        raise CheckpointError(f"{path}: \"tokenizer\" must record n_vocab and fingerprint")
    if tok["n_vocab"] != config.vocab_size:
        raise CheckpointError(f"{path}: \"tokenizer\" records {tok['n_vocab']:,} tokens but the model's vocab_size is "
                              f"{config.vocab_size:,}; the file was edited or damaged")
    if "lora" in meta:
        try:
            meta["lora"] = LoRAConfig.from_dict(meta["lora"])
        except SettingError as e:  # the "lora" section's settings, e.g. "lora-rank must be ..."
            raise CheckpointError(f"{path}: {e.render(lambda name: name.replace('_', '-'))}") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return {**meta, "model": config}


def check_same_tokenizer(directory, other) -> None:
    """CheckpointError unless the checkpoints ``directory`` and ``other`` record the same tokenizer
    (its fingerprint in config.json; no weights are read): a draft model for speculative decoding
    must share its target's."""
    mine, theirs = read_meta(directory), read_meta(other)
    if mine["tokenizer"]["fingerprint"] != theirs["tokenizer"]["fingerprint"]:
        raise CheckpointError(f"{other}: its tokenizer (fingerprint {theirs['tokenizer']['fingerprint']}) is not the one of "
                              f"{directory} ({mine['tokenizer']['fingerprint']}); a draft model must be trained with the same tokenizer")


@contextlib.contextmanager
def safetensors_name(path) -> Iterator[str]:
    """``path`` as safetensors' reader takes it, a name of valid UTF-8 (it refuses any other). A name
    that is not (its bytes kept by Python as surrogates: a run directory called so was written, then
    could not be read back) is passed as /proc/self/fd/N of the file, opened here for the block."""
    name = os.fspath(path)
    if is_unicode(name):
        yield name
        return
    if not os.path.isdir("/proc/self/fd"):
        raise InputFileError(name, f"{name}: the safetensors reader takes file names of valid UTF-8 only; rename the file "
                                   "or its directory")
    fd = os.open(name, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def check_weights(directory, meta: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    """Every ``expected`` tensor (name -> shape, as ``state_dict_shapes``) present, none extra, right
    shape and the recorded dtype (read from the header only)."""
    path = checkpoint_file(directory, WEIGHTS_FILE, "safetensors file")
    try:
        with safetensors_name(path) as name, safe_open(name, framework="pt") as f:
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


def non_finite_tensors(directory, name: str = WEIGHTS_FILE) -> list[str]:
    """The names of the tensors in the safetensors file ``directory/name`` (the weights by default)
    holding a NaN or an infinity (read one tensor at a time: a model's worth of memory is never needed)."""
    path = checkpoint_file(directory, name, "safetensors file")
    try:
        with safetensors_name(path) as file_name, safe_open(file_name, framework="pt") as f:
            return [name for name in f.keys() if not torch.isfinite(f.get_tensor(name)).all()]
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def checkpoint_file(directory, name: str, what: str, hint: str = "") -> Path:
    """``directory/name``, a regular file, else a CheckpointError saying what is there instead (nothing,
    a FIFO, a device, a directory, a link loop), without opening it."""
    try:
        return check_regular_file(Path(directory) / name, what, hint or f"a checkpoint directory needs {name}")
    except InputFileError as e:
        raise CheckpointError(str(e)) from None


def load_tokenizer(directory, meta: dict[str, Any]):
    path = checkpoint_file(directory, TOKENIZER_FILE, "tokenizer.json file")
    try:
        tokenizer = tokenizers_bpe.load(path)
    except ValueError as e:  # (its message names the file already, or not)
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
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
    unknown = sorted(set(generation) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_DEFAULTS)}")
    settings = {**SAMPLING_DEFAULTS, **generation}
    try:  # the sampler's own checks, so that every reader (gpt-inspect too) refuses what gpt-generate would
        check_sampling_settings(settings["temperature"], settings["top_k"], settings["top_p"], settings["repetition_penalty"])
        check_count("max_new_tokens", settings["max_new_tokens"], MAX_NEW_TOKENS)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return generation


def read_adapters(directory, model, meta: dict[str, Any], device) -> dict[str, torch.Tensor]:
    """Wrap the model's target layers in LoRA (``meta["lora"]``) and read adapters.safetensors,
    checked against them (names, shapes, dtype); returns the tensors (``load_adapters`` loads them)."""
    path = checkpoint_file(directory, ADAPTERS_FILE, "safetensors file",
                            f"{CONFIG_FILE} has a \"lora\" section, so the adapters are needed")
    try:
        with safetensors_name(path) as name:
            adapters = load_file(name, device=str(device))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    apply_lora(model, meta["lora"])
    try:
        check_state_shapes(adapter_shapes(model), {k: tuple(v.shape) for k, v in adapters.items()}, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for name, tensor in adapters.items():
        if tensor.dtype != DTYPES[meta["dtype"]]:
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, but {CONFIG_FILE} records {meta['dtype']}")
    return adapters


def load_adapters(directory, model, meta: dict[str, Any], device) -> None:
    """Wrap the model's target layers in LoRA (``meta["lora"]``) and load adapters.safetensors."""
    model.load_state_dict(read_adapters(directory, model, meta, device), strict=False)


def check_state_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str) -> None:
    """ValueError naming the first missing, unexpected or wrongly shaped tensor."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise ValueError(f"{what}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise ValueError(f"{what}: unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''} for this config")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ValueError(f"{what}: tensor {name} has shape {list(found[name])}, but the config implies {list(shape)}")


class PretrainedMixin:
    """Checkpoint loading and saving for the model class it is mixed into (``gpt.model.GPT``, which
    this module does not import): ``cls(config)`` builds a model, ``tie_weights()`` re-ties shared
    weights, and ``config``, ``tokenizer``, ``generation_config`` are its attributes."""

    def save_pretrained(self, directory, *, tokenizer=None, generation: dict | None = None) -> None:
        """Write config.json, model.safetensors, tokenizer.json (and generation.json) atomically."""
        save_pretrained(directory, self, tokenizer, generation)

    @classmethod
    def from_pretrained(cls, directory, *, device="cpu", dtype: torch.dtype | str | None = None, backend: str | None = None):
        """Load and validate a checkpoint directory, in eval mode. ``dtype`` (a torch dtype or
        "float32" / "bfloat16" / "float16") casts the weights; ``backend`` overrides the saved one."""
        directory = Path(directory)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        meta = read_meta(directory)
        try:  # before a weight is read: the file may be as large as the config says
            check_model_fits(meta["model"], DTYPES[meta["dtype"]].itemsize, str(directory / CONFIG_FILE))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if backend is not None:
            meta["model"].backend = backend
            meta["model"].validate()
        check_weights(directory, meta, cls.expected_shapes(meta["model"]))
        tokenizer = load_tokenizer(directory, meta)
        generation = read_generation(directory)
        try:
            with safetensors_name(directory / WEIGHTS_FILE) as name:
                state = load_file(name, device=str(device))
        except Exception as e:  # safetensors' own error types for data cut short or corrupt
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
        model = cls.from_state_dict(meta["model"], state, what=str(directory / WEIGHTS_FILE))
        if "lora" in meta:
            load_adapters(directory, model, meta, device)
        if dtype is not None:
            model = model.to(dtype=dtype)
        model.tokenizer = tokenizer
        model.generation_config = generation
        return model.eval()  # as transformers does; the trainer calls model.train()

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state_dict: dict[str, torch.Tensor], *, what: str = "weights"):
        """Build a model holding exactly ``state_dict`` (names as ours, ``lm_head.weight`` left out
        when tied). Missing, unexpected or wrongly shaped tensors are ValueErrors naming them; the
        model is built on the meta device first, so no memory or time goes into a random init."""
        with torch.device("meta"):
            model = cls(config)
        check_state_shapes(model.state_dict_shapes(), {k: tuple(v.shape) for k, v in state_dict.items()}, what)
        model.load_state_dict(state_dict, strict=False, assign=True)
        model.tie_weights()
        return model

    @classmethod
    def expected_shapes(cls, config: GPTConfig) -> dict[str, tuple[int, ...]]:
        """The tensors a checkpoint of this config holds (built on the meta device: no memory)."""
        with torch.device("meta"):
            return cls(config).state_dict_shapes()

    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors a checkpoint stores (tied ``lm_head.weight`` left out)."""
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            del shapes["lm_head.weight"]
        return shapes
