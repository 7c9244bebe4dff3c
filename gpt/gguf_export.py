"""A model as a GGUF file for llama.cpp, written with ``gguf`` (the format's Python library,
maintained with llama.cpp): llama.cpp's ``gpt2`` architecture, with the tensor names, layouts and
metadata keys that llama.cpp's own ``convert_hf_to_gguf.py`` writes for a ``GPT2LMHeadModel``, and our
tokenizer as a GPT-2 ("gpt2") byte-level BPE vocabulary.

llama.cpp splits text before BPE with one of the pre-tokenizers it knows by name
(``tokenizer.ggml.pre``); it has GPT-2's pattern ("gpt-2") but none equal to GPT-4's (its nearest,
"llama-bpe"/"dbrx", cuts whitespace that ends a text after a newline differently) or to a custom one,
and it has no character-level vocabulary. Those are refused (ExportError) rather than written wrong.

Tensors keep our nn.Linear layout [out, in] (llama.cpp's converter transposes GPT-2's Conv1D
weights to exactly that). The output head is written even when tied to the embedding, as llama.cpp's
converter does. With f16 or q8_0, 1-D tensors (LayerNorms, biases) and the position embedding stay
f32, as in llama.cpp's converter; a q8_0 tensor whose rows are not a multiple of 32 is written f16.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn as nn

import gpt2_kernels
from tokenizers_bpe import BPETokenizer, Tokenizer
from tokenizers_bpe.hf_tokenizer import ExportError, all_merges, byte_level_string
from tokenizers_bpe.patterns import GPT2_PATTERN, GPT4_PATTERN

from .model import GPT

GGUF_DTYPES = ("f32", "f16", "q8_0")
F16_MAX = float(np.finfo(np.float16).max)
GGUF_TOOLKIT_KEY = "gpt2_toolkit.format"  # our stamp among the metadata (llama.cpp ignores unknown keys)
GGUF_TOOLKIT_FORMAT = "gpt2-toolkit-gguf"
# llama.cpp's pre-tokenizer names whose regex is exactly ours (llama-vocab.cpp)
LLAMA_CPP_PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2"}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_TARGET = "llama.cpp (GGUF)"


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + "." + suffix


def gguf_tensor_names(n_layer: int) -> dict[str, str]:
    """Our parameter name -> llama.cpp's tensor name (gpt2 architecture)."""
    T = gguf.MODEL_TENSOR
    names = {
        "transformer.wte.weight": _name(T.TOKEN_EMBD, "weight"),
        "transformer.wpe.weight": _name(T.POS_EMBD, "weight"),
        "transformer.ln_f.weight": _name(T.OUTPUT_NORM, "weight"),
        "transformer.ln_f.bias": _name(T.OUTPUT_NORM, "bias"),
        "lm_head.weight": _name(T.OUTPUT, "weight"),
    }
    per_layer = {"ln_1": T.ATTN_NORM, "attn.c_attn": T.ATTN_QKV, "attn.c_proj": T.ATTN_OUT, "ln_2": T.FFN_NORM,
                 "mlp.c_fc": T.FFN_UP, "mlp.c_proj": T.FFN_DOWN}
    for i in range(n_layer):
        for ours, theirs in per_layer.items():
            for suffix in ("weight", "bias"):
                names[f"transformer.h.{i}.{ours}.{suffix}"] = _name(theirs, suffix, i)
    return names


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Every tensor llama.cpp's gpt2 model reads, float32, under its GGUF name. GPT-2 always has
    biases: a bias-free model gets zero biases (the same function); a tied head is written out."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight.detach().float().cpu()
    for name, module in model.named_modules():
        if name != "lm_head" and isinstance(module, (nn.Linear, gpt2_kernels.LayerNorm)) and module.bias is None:
            state[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    names = gguf_tensor_names(model.config.n_layer)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ExportError(f"a model with the tensor {unknown[0]}", _TARGET, "llama.cpp's gpt2 architecture has no such tensor")
    return {names[k]: state[k].numpy() for k in names}


def llama_cpp_pre_tokenizer(tok: Tokenizer) -> str:
    """``tokenizer.ggml.pre`` for ``tok``: the llama.cpp pre-tokenizer with exactly its pattern."""
    if not isinstance(tok, BPETokenizer):
        raise ExportError(f"a {tok.type} tokenizer", _TARGET, "llama.cpp's GPT-2 vocabulary is byte-level BPE")
    pre = LLAMA_CPP_PRE_TOKENIZERS.get(tok.pattern)
    if pre is None:
        known = "GPT-4's pattern" if tok.pattern == GPT4_PATTERN else "a custom pattern"
        raise ExportError(f"a tokenizer with {known}", _TARGET,
                          "llama.cpp has no pre-tokenizer with this exact regex (only GPT-2's, 'gpt-2'); "
                          "export it with gpt-convert hf-export instead")
    return pre


def gguf_vocabulary(tok: BPETokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of llama.cpp's "gpt2" tokenizer model, ``vocab_size`` entries
    (the model's rows): ordinary tokens as GPT-2 byte strings, special tokens as themselves (control),
    ids no token uses as "[PAD<id>]" (unused), as llama.cpp's converter does."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    strings = [byte_level_string(tok.decode_single_token_bytes(i)) for i in range(len(tok.mergeable_ranks))]
    for i, s in enumerate(strings):
        tokens[i], types[i] = s, int(gguf.TokenType.NORMAL)
    for s, i in tok.special_tokens.items():
        tokens[i], types[i] = s, int(gguf.TokenType.CONTROL)
    merges = [f"{strings[a]} {strings[b]}" for a, b in all_merges(tok)]
    return tokens, types, merges


def check_gguf_exportable(model: GPT) -> str:
    """The pre-tokenizer name, or an ExportError for a model llama.cpp cannot run exactly."""
    if model.config.pos_embedding != "learned":
        raise ExportError(f"a model with '{model.config.pos_embedding}' position embeddings", _TARGET,
                          "llama.cpp's gpt2 architecture has learned position embeddings")
    if model.tokenizer is None:
        raise ExportError("a model without a tokenizer", _TARGET, "GGUF carries the vocabulary")
    return llama_cpp_pre_tokenizer(model.tokenizer)


def _encode(array: np.ndarray, name: str, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    keep_f32 = dtype == "f32" or array.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".")
    if keep_f32:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    largest = float(np.abs(array).max(initial=0.0))
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        _check_f16_range(largest / 127, name, dtype)  # a block's scale (its largest value / 127) is an f16
        return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    _check_f16_range(largest, name, dtype)  # (q8_0: rows not a multiple of the block size are f16, as in llama.cpp's converter)
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def _check_f16_range(value: float, name: str, dtype: str) -> None:
    if not value <= F16_MAX:
        raise ExportError(f"tensor {name} (values up to {value:.3g} in magnitude)", f"GGUF {dtype}",
                          f"float16 holds at most {F16_MAX:g}; export with --dtype f32")


def write_gguf(model: GPT, path, dtype: str = "f16", name: str = "gpt2-toolkit") -> None:
    """Write ``model`` (with its tokenizer) to ``path`` as GGUF (not atomically: the caller writes a
    temporary file and renames it)."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    pre = check_gguf_exportable(model)
    config, tok = model.config, model.tokenizer
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_string(GGUF_TOOLKIT_KEY, GGUF_TOOLKIT_FORMAT)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_file_type(_FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gguf_vocabulary(tok, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tok.eot_token is not None:
        writer.add_bos_token_id(tok.eot_token)
        writer.add_eos_token_id(tok.eot_token)
    writer.add_add_bos_token(False)  # a prompt is encoded as is, as gpt-generate and transformers do
    writer.add_add_eos_token(False)
    for tensor_name, array in gguf_tensors(model).items():
        data, qtype = _encode(array, tensor_name, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
