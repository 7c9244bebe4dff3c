"""gpt-convert: bring GPT-2 weights in from OpenAI's TensorFlow release or a Hugging Face directory,
and export ours to Hugging Face and llama.cpp.

    gpt-convert openai    SRC OUT   OpenAI's model.ckpt.* + hparams.json + encoder.json + vocab.bpe
    gpt-convert hf-import SRC OUT   transformers GPT-2 dir: config.json + model.safetensors (or
                                    pytorch_model.bin, loaded without running pickle code)
    gpt-convert hf-export SRC OUT   our checkpoint -> dir that GPT2LMHeadModel.from_pretrained loads, with
                                    HF tokenizer files giving our ids (tools/exports.py)
    gpt-convert gguf SRC OUT.gguf   our checkpoint -> a GGUF file llama.cpp runs (gpt.gguf_export)
    gpt-convert merge-lora SRC OUT  fold a checkpoint's LoRA adapters (gpt-finetune --lora-rank) into its
                                    base weights: an ordinary checkpoint with the same outputs

Weight layout: OpenAI and Hugging Face store the four projections as Conv1D, weight [in, out] (OpenAI
with a leading 1), the transpose of our nn.Linear [out, in]. Everything else maps by name.
``tensorflow`` and ``transformers`` are not runtime dependencies: TensorFlow is imported by the openai
path only, and the Hugging Face paths need no transformers (its files are plain JSON + safetensors);
only ``to_transformers`` (an in-memory twin for tests and benchmarks) imports it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Collection
from pickle import UnpicklingError  # only to recognise what weights_only=True refuses

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import gpt2_kernels
import tokenizers_bpe
from gpt.checkpoint import CHECKPOINT_STAMP, check_vocab, non_finite_tensors, safetensors_name, write_checkpoint
from gpt.classifier import CLASSIFIER_FILE, HEAD_FILE
from gpt.config import GPTConfig
from gpt.device import dtype_name
from gpt.gguf_export import GGUF_DTYPES
from gpt.lora import merge_lora
from gpt.memory import check_model_fits
from gpt.model import GPT
from tokenizers_bpe import ENDOFTEXT
from tokenizers_bpe.errors import InputFileError
from tokenizers_bpe.hf_tokenizer import hf_special_token_names
from tokenizers_bpe.fileio import Stamp, atomic_directory, check_directory, check_regular_file, format_stamp, read_json, resolve_path
from tools.cli import ArgumentParser, CLIError, command, file_path, output_directory
from tools.models import check_finite_weights, model_argument
from tools.exports import check_gguf_output, gguf_exportable, hf_tokenizer_content, write_gguf_atomically, write_hf_tokenizer
from tools.outputs import check_not_an_input, check_output, check_writable_dir

HF_CONFIG_FILE = "config.json"  # transformers' own, not our checkpoint's (gpt.checkpoint.CONFIG_FILE)
HF_EXPORT_FILE = "gpt2_toolkit_export.json"  # our stamp in an export (transformers ignores the file)
HF_EXPORT_STAMP = Stamp("gpt2-toolkit-hf-export", "a Hugging Face export", HF_EXPORT_FILE)
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def is_conv1d_weight(name: str) -> bool:
    return name.endswith(CONV1D_WEIGHTS)


def read_json_file(path: Path, what: str) -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a JSON object")
    return data


def load_gpt2_tokenizer(encoder_json: Path, vocab_bpe: Path, hint: str, special_names: Collection[str] = (ENDOFTEXT,)):
    for p in (encoder_json, vocab_bpe):
        check_regular_file(p, "file", hint)
    return tokenizers_bpe.load_gpt2(encoder_json, vocab_bpe, special_names)


def load_tokenizer_file(path: Path):
    try:
        check_regular_file(path, "tokenizer.json file")
    except InputFileError as e:
        raise CLIError(f"--tokenizer {e}") from None
    return tokenizers_bpe.load(path)


def save_converted(out: Path, config: GPTConfig, state: dict, tokenizer, what: str) -> GPT:
    check_vocab(tokenizer.n_vocab, config.vocab_size, f"the tokenizer for {what}")
    model = GPT.from_state_dict(config, state, what=what)
    model.save_pretrained(out, tokenizer=tokenizer)
    return model


# ---------------------------------------------------------------------------------------------- OpenAI


def import_tensorflow():
    # TensorFlow and Triton both embed LLVM: loading TensorFlow's first makes `import triton` abort the
    # process, while the other order works. This module imports gpt2_kernels (hence triton) at the top.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off stderr
    try:
        import tensorflow as tf
    except ImportError:
        raise CLIError(
            "reading OpenAI's checkpoints needs TensorFlow, which is not installed: "
            "pip install 'gpt2-toolkit[openai]' (or: pip install tensorflow-cpu)"
        ) from None
    return tf


def openai_layout(config: GPTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """OpenAI variable name -> (our parameter name, the shape hparams.json implies)."""
    C = config.n_embd
    layout = {
        "model/wte": ("transformer.wte.weight", (config.vocab_size, C)),
        "model/wpe": ("transformer.wpe.weight", (config.n_ctx, C)),
        "model/ln_f/g": ("transformer.ln_f.weight", (C,)),
        "model/ln_f/b": ("transformer.ln_f.bias", (C,)),
    }
    for i in range(config.n_layer):
        for sub, n_in, n_out in (("attn/c_attn", C, 3 * C), ("attn/c_proj", C, C), ("mlp/c_fc", C, 4 * C), ("mlp/c_proj", 4 * C, C)):
            ours = f"transformer.h.{i}.{sub.replace('/', '.')}"
            layout[f"model/h{i}/{sub}/w"] = (f"{ours}.weight", (1, n_in, n_out))
            layout[f"model/h{i}/{sub}/b"] = (f"{ours}.bias", (n_out,))
        for ln in ("ln_1", "ln_2"):
            layout[f"model/h{i}/{ln}/g"] = (f"transformer.h.{i}.{ln}.weight", (C,))
            layout[f"model/h{i}/{ln}/b"] = (f"transformer.h.{i}.{ln}.bias", (C,))
    return layout


def read_openai_hparams(path: Path) -> GPTConfig:
    hparams = read_json_file(path, "OpenAI's hparams.json with n_vocab, n_ctx, n_embd, n_head, n_layer")
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    missing = [k for k in keys if k not in hparams]
    if missing:
        raise CLIError(f"{path}: missing {', '.join(missing)}")
    try:
        return GPTConfig(vocab_size=hparams["n_vocab"], **{k: hparams[k] for k in keys[1:]})
    except ValueError as e:
        raise CLIError(f"{path}: {e}") from None


def openai_import(src: Path, out: Path) -> GPT:
    config = read_openai_hparams(src / "hparams.json")
    tokenizer = load_gpt2_tokenizer(src / "encoder.json", src / "vocab.bpe", "OpenAI's release has encoder.json and vocab.bpe next to the checkpoint")
    tf = import_tensorflow()
    prefix = tf.train.latest_checkpoint(str(src)) or str(src / "model.ckpt")
    if not Path(prefix + ".index").is_file():
        raise CLIError(f"{src}: no TensorFlow checkpoint found (expected a 'checkpoint' file or model.ckpt.index)")
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise CLIError(f"{prefix}: cannot read the TensorFlow checkpoint ({getattr(e, 'message', e)})") from None
    shapes = reader.get_variable_to_shape_map()
    layout = openai_layout(config)
    for name, (_, shape) in layout.items():
        if name not in shapes:
            raise CLIError(f"{prefix}: variable {name} is missing from the TensorFlow checkpoint")
        if tuple(shapes[name]) != shape:
            raise CLIError(
                f"{prefix}: variable {name} has shape {list(shapes[name])} but hparams.json "
                f"(n_vocab={config.vocab_size}, n_ctx={config.n_ctx}, n_embd={config.n_embd}) implies {list(shape)}"
            )
    extra = sorted(n for n in shapes if n.startswith("model/") and n not in layout)
    if extra:
        raise CLIError(f"{prefix}: variable {extra[0]} is not part of a GPT-2 with hparams.json's n_layer={config.n_layer}")
    state = {}
    for name, (ours, _) in tqdm(layout.items(), desc="reading TF variables", unit="tensor", leave=False):
        array = reader.get_tensor(name)
        tensor = torch.from_numpy(array[0].T.copy() if is_conv1d_weight(ours) else array)
        state[ours] = tensor.float()
    return save_converted(out, config, state, tokenizer, str(prefix))


# ---------------------------------------------------------------------------------------------- Hugging Face

HF_ATTENTION_MASK = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers in old files
HF_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: dict, path: Path) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CLIError(f"{path}: model_type is {hf.get('model_type')!r}; only GPT-2 ('gpt2') can be imported")
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": hf.get("activation_function", "gelu_new") not in HF_TANH_GELUS,
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else n_embd),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False) is not False,
        "add_cross_attention": hf.get("add_cross_attention", False) is not False,
    }
    for key, bad in unsupported.items():
        if bad:
            raise CLIError(f"{path}: {key}={hf.get(key)!r} is not GPT-2's architecture and cannot be imported")
    try:
        config = GPTConfig(
            vocab_size=hf.get("vocab_size", 50257),
            n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_embd=n_embd,
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            dropout=hf.get("resid_pdrop", 0.1),  # we have no attention-probability dropout (attn_pdrop)
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
        check_model_fits(config, what=str(path))  # before a weight is read
    except (ValueError, TypeError) as e:
        raise CLIError(f"{path}: {e}") from None
    return config


def config_to_hf(config: GPTConfig, dtype: torch.dtype, eot_token: int | None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,  # read by llama.cpp's convert_hf_to_gguf.py
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "dtype": dtype_name(dtype),
        "use_cache": True,
    }


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (single or sharded), else pytorch_model.bin without pickle code execution."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_file(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise CLIError(f"{index}: \"weight_map\" must be an object mapping tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        if any(Path(name).name != name for name in files):
            raise CLIError(f"{index}: a shard file name in \"weight_map\" holds a directory; shards lie beside the index")
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (src / "pytorch_model.bin").is_file():
        return read_torch_bin(src / "pytorch_model.bin")
    else:
        raise CLIError(f"{src}: no model.safetensors or pytorch_model.bin found")
    state = {}
    for name in files:
        path = check_regular_file(src / name, "safetensors file", f"listed in {index.name}")
        try:
            with safetensors_name(path) as file_name, safe_open(file_name, framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise CLIError(f"{path}: not a readable safetensors file ({e})") from None
    return state


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin's tensors, loaded with weights_only=True: never running pickle code."""
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (0x80, protocol).
    if not zipfile.is_zipfile(path) and not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CLIError(f"{path}: not a PyTorch weights file (neither the zip archive nor the pickle torch.save writes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as e:
        if not re.search(r"unsupported (global|operand)", str(e), re.IGNORECASE):  # damaged, not code
            raise CLIError(f"{path}: not a readable PyTorch weights file (a damaged pickle)") from None
        raise CLIError(
            f"{path}: refusing to load: this file needs pickle code execution (it holds Python objects, not just "
            "tensors); convert it to safetensors with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CLIError(f"{path}: not a readable PyTorch weights file ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{path}: expected a dict of tensors (a state_dict)")
    return state


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in hf_state.items():
        if HF_ATTENTION_MASK.search(name):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # files saved from GPT2Model have no prefix
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the same tensor as transformer.wte.weight
        if not tensor.is_floating_point() or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; GPT-2 weights are "
                             "float32, float16 or bfloat16")
        if is_conv1d_weight(name) and tensor.dim() != 2:
            raise ValueError(f"tensor {name} has {tensor.dim()} dimensions; a Conv1D weight has 2")
        state[name] = tensor.t().contiguous() if is_conv1d_weight(name) else tensor
    return state


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names. GPT-2 always has biases, so a bias-free model gets zero
    biases (the same function)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[name] = (tensor.t() if is_conv1d_weight(name) else tensor).detach().contiguous().cpu()
    for name, module in model.named_modules():
        if name != "lm_head" and isinstance(module, (nn.Linear, gpt2_kernels.LayerNorm)) and module.bias is None:
            state[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return state


def to_transformers(model: GPT):
    """An in-memory transformers.GPT2LMHeadModel holding a copy of the model's weights (for
    comparisons; needs transformers, imported here only)."""
    import transformers

    if model.config.pos_embedding != "learned":
        raise ValueError(f"Hugging Face GPT-2 has learned position embeddings; a '{model.config.pos_embedding}' model has no GPT-2 twin")
    eot = model.tokenizer.eot_token if model.tokenizer is not None else None
    config = transformers.GPT2Config(**config_to_hf(model.config, model.lm_head.weight.dtype, eot))
    with torch.device("meta"):  # skip transformers' random init: every weight is assigned below
        hf = transformers.GPT2LMHeadModel(config)
    state = {k: v.clone() for k, v in state_dict_to_hf(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise AssertionError(f"GPT-2 weight mapping out of date: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.train(model.training)


def hf_import(src: Path, out: Path, tokenizer_file: Path | None = None) -> GPT:
    check_directory(src, "transformers GPT-2 directory")
    config = config_from_hf(read_json_file(src / HF_CONFIG_FILE, "a transformers GPT-2 directory has config.json"), src / HF_CONFIG_FILE)
    if tokenizer_file is not None:
        tokenizer = load_tokenizer_file(tokenizer_file)
    else:
        tokenizer = load_gpt2_tokenizer(src / "vocab.json", src / "merges.txt", "pass the tokenizer with --tokenizer FILE",
                                        {ENDOFTEXT, *hf_special_token_names(src)})
    try:
        state = state_dict_from_hf(read_hf_weights(src), config)
    except ValueError as e:  # (its message names the file already, or not)
        raise CLIError(str(e) if str(src) in str(e) else f"{src}: {e}") from None
    return save_converted(out, config, state, tokenizer, str(src))


def load_for_export(src: Path, target: str) -> GPT:
    model = GPT.from_pretrained(src)
    check_finite_weights(model, src)
    if getattr(model, "lora_config", None) is not None:
        merge_lora(model)  # GPT-2 has no adapters: export the weights with them folded in
    if model.config.pos_embedding != "learned":
        raise CLIError(f"{src}: {target} has learned position embeddings; a '{model.config.pos_embedding}' model cannot be exported as GPT-2")
    return model


def hf_export(src: Path, out: Path) -> None:
    """OUT: transformers' config.json + model.safetensors, and HF tokenizer files that give our ids
    (tokenizer.json always; GPT-2's vocab.json + merges.txt where they are exact)."""
    model = load_for_export(src, "Hugging Face GPT-2")
    config, tokenizer = model.config, model.tokenizer
    tokenizer_json = hf_tokenizer_content(tokenizer)  # refused here, before anything is written
    dtype = model.transformer.wte.weight.dtype
    with atomic_directory(out, HF_EXPORT_STAMP) as tmp:
        (tmp / HF_EXPORT_FILE).write_text(json.dumps({**format_stamp(HF_EXPORT_STAMP.format, 1), "source": str(src)}, indent=2) + "\n",
                                          encoding="utf-8")
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype, tokenizer.eot_token), indent=2) + "\n", encoding="utf-8")
        save_file(state_dict_to_hf(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_hf_tokenizer(tokenizer, tmp, tokenizer_json, config.n_ctx)


def gguf_export(src: Path, out: Path, dtype: str) -> None:
    """OUT: one GGUF file for llama.cpp (gpt2 architecture, our vocabulary and merges)."""
    model = load_for_export(src, "llama.cpp's gpt2 architecture")
    gguf_exportable(model, src)
    write_gguf_atomically(model, out, dtype)


def merge_checkpoint(src: Path, out: Path) -> None:
    """``gpt-convert merge-lora``: load SRC (base weights + adapters), fold the adapters in and write
    an ordinary checkpoint to OUT (atomically). A classifier's head and labels are copied along."""
    model = GPT.from_pretrained(src)
    check_finite_weights(model, src)
    if getattr(model, "lora_config", None) is None:
        raise ValueError(f"{src}: this checkpoint has no LoRA adapters (no \"lora\" section in config.json); nothing to merge")
    if resolve_path(src) == resolve_path(out):
        raise ValueError(f"OUT must differ from SRC ({src}); the merged model is a new checkpoint")
    if (src / HEAD_FILE).exists() and (damaged := non_finite_tensors(src, HEAD_FILE)):
        raise CLIError(f"{src / HEAD_FILE}: NaN or inf in {', '.join(damaged)}: the classifier head is damaged")
    merge_lora(model)
    with atomic_directory(out, CHECKPOINT_STAMP) as tmp:
        write_checkpoint(tmp, model, model.tokenizer, model.generation_config)
        for name in (CLASSIFIER_FILE, HEAD_FILE):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="gpt-convert", description="Convert GPT-2 weights between OpenAI's, Hugging Face's and this toolkit's formats, "
                                                                 "and export them to llama.cpp (GGUF).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)

    p = commands.add_parser("openai", help="import OpenAI's TensorFlow GPT-2 checkpoint (needs tensorflow)",
                            description="Import OpenAI's GPT-2 release: SRC holds checkpoint, model.ckpt.*, hparams.json, encoder.json, vocab.bpe.")
    p.add_argument("src", type=Path, metavar="SRC", help="directory of OpenAI's files (e.g. models/124M)")
    p.add_argument("out", type=output_directory, metavar="OUT", help="checkpoint directory to write")
    p.set_defaults(run=lambda a: openai_import(a.src, a.out))

    p = commands.add_parser("hf-import", help="import a Hugging Face transformers GPT-2 directory",
                            description="Import a transformers GPT-2 directory (config.json + model.safetensors or pytorch_model.bin).")
    p.add_argument("src", type=Path, metavar="SRC", help="transformers GPT-2 directory")
    p.add_argument("out", type=output_directory, metavar="OUT", help="checkpoint directory to write")
    p.add_argument("--tokenizer", type=Path, metavar="FILE", default=None,
                   help="tokenizer.json to use instead of SRC's vocab.json + merges.txt")
    p.set_defaults(run=lambda a: hf_import(a.src, a.out, a.tokenizer))

    p = commands.add_parser("hf-export", help="export a checkpoint as a Hugging Face GPT-2 directory",
                            description="Export a checkpoint so that transformers.GPT2LMHeadModel.from_pretrained(OUT) loads it, with "
                                        "Hugging Face tokenizer files that give the tokenizer's ids (tokenizer.json, "
                                        "tokenizer_config.json, special_tokens_map.json; GPT-2's vocab.json + merges.txt "
                                        "where those are exact): AutoTokenizer, pipeline('text-generation') and "
                                        "tokenizers.Tokenizer.from_file work for every kind of tokenizer trained here. "
                                        "config.json carries n_ctx too, for llama.cpp's convert_hf_to_gguf.py.")
    p.add_argument("src", type=Path, metavar="SRC", help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("out", type=output_directory, metavar="OUT", help="directory to write")
    p.set_defaults(run=lambda a: hf_export(a.src, a.out))

    p = commands.add_parser("gguf", help="export a checkpoint as a GGUF file for llama.cpp",
                            description="Export a checkpoint as one GGUF file that llama.cpp runs (architecture gpt2; the "
                                        "tokenizer as a GPT-2 byte-level BPE vocabulary with its merges). Only a tokenizer "
                                        "with GPT-2's pattern can be exported: llama.cpp has no pre-tokenizer equal to "
                                        "GPT-4's or a custom pattern, nor a char-level vocabulary (those are refused). Run it "
                                        "with: llama-completion -m OUT.gguf -p 'ROMEO:' -n 100 --temp 0")
    p.add_argument("src", type=Path, metavar="RUN_OR_MODEL", help="checkpoint directory, or a run directory (its final checkpoint)")
    p.add_argument("out", type=file_path, metavar="OUT.gguf", help="GGUF file to write")
    p.add_argument("--dtype", choices=GGUF_DTYPES, default="f16",
                   help="weights type: f32, f16 or q8_0 (8-bit blocks of 32; rows not a multiple of 32 "
                        "stay f16); LayerNorms, biases and the position embedding stay f32, as llama.cpp's converter writes them")
    p.set_defaults(run=lambda a: gguf_export(a.src, a.out, a.dtype))

    p = commands.add_parser("merge-lora", help="merge a checkpoint's LoRA adapters into its base weights",
                            description="Fold LoRA adapters (adapters.safetensors, from gpt-finetune --lora-rank) into the base weights; "
                                        "OUT is an ordinary checkpoint (a classifier's head and labels are copied along).")
    p.add_argument("src", type=Path, metavar="SRC", help="checkpoint directory with adapters (e.g. RUN_DIR/final)")
    p.add_argument("out", type=output_directory, metavar="OUT", help="checkpoint directory to write")
    p.set_defaults(run=lambda a: merge_checkpoint(a.src, a.out))
    return parser


@command("gpt-convert")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("hf-export", "merge-lora", "gguf"):
        args.src = model_argument(args.src, f"gpt-convert {args.command}")
    inputs = [args.src, getattr(args, "tokenizer", None)]
    if args.command == "gguf":
        check_not_an_input(args.out, inputs, "OUT")
        check_gguf_output(args.out)
        check_writable_dir(args.out.parent if str(args.out.parent) else Path("."), "OUT", keep=False)
    else:
        check_output(args.out, HF_EXPORT_STAMP if args.command == "hf-export" else CHECKPOINT_STAMP, "OUT", inputs=inputs)
    args.run(args)
    print(f"gpt-convert {args.command}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
