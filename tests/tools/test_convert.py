"""gpt-convert: OpenAI TF checkpoints and Hugging Face directories in, Hugging Face out.

Every input is built here: a random GPT-2 written by TensorFlow under OpenAI's variable names, and a
random transformers GPT-2 saved with save_pretrained. The reference logits come from a transformers
model holding the source weights, mapped independently of tools.convert."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tokenizers_bpe
from gpt.model import GPT, GPTConfig
from tools.convert import main
from tests.gpt.test_checkpoint import text, tokenizer  # noqa: F401 (shared fixtures: a 300-token BPE)

HPARAMS = {"n_vocab": 300, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
TEXT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def tf():
    # Slow (seconds), so imported once. Triton is already loaded (gpt.model imports gpt2_kernels at
    # collection): importing TensorFlow first would make a later `import triton` abort the process.
    import tensorflow

    return tensorflow


@pytest.fixture(scope="module")
def transformers():
    import transformers

    return transformers


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_cli_error(capsys, argv, message):
    rc, err = run_cli(capsys, *argv)
    assert rc == 2
    assert re.match(r"gpt-convert( [a-z-]+)?: error: ", err) and err.count("\n") == 1, err
    assert re.search(message, err), err


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def assert_parity(ours, theirs, idx=None):
    idx = torch.randint(0, 300, (2, 24)) if idx is None else idx
    assert (logits_of(ours, idx) - logits_of(theirs, idx)).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------- OpenAI


def openai_arrays(hparams, seed=0) -> dict[str, np.ndarray]:
    """A random GPT-2 in OpenAI's layout: Conv1D weights [1, in, out], LayerNorm g/b."""
    rng = np.random.default_rng(seed)
    C = hparams["n_embd"]

    def rand(*shape, scale=0.02):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    arrays = {"model/wte": rand(hparams["n_vocab"], C), "model/wpe": rand(hparams["n_ctx"], C),
              "model/ln_f/g": 1 + rand(C, scale=0.1), "model/ln_f/b": rand(C, scale=0.1)}
    for i in range(hparams["n_layer"]):
        for sub, n_in, n_out in (("attn/c_attn", C, 3 * C), ("attn/c_proj", C, C), ("mlp/c_fc", C, 4 * C), ("mlp/c_proj", 4 * C, C)):
            arrays[f"model/h{i}/{sub}/w"] = rand(1, n_in, n_out)
            arrays[f"model/h{i}/{sub}/b"] = rand(n_out, scale=0.1)
        for ln in ("ln_1", "ln_2"):
            arrays[f"model/h{i}/{ln}/g"] = 1 + rand(C, scale=0.1)
            arrays[f"model/h{i}/{ln}/b"] = rand(C, scale=0.1)
    return arrays


def write_openai_dir(tf, directory, arrays, hparams, tokenizer):
    """OpenAI's release layout, the checkpoint written by TensorFlow's SaveV2 (names kept verbatim)."""
    directory.mkdir(parents=True)
    names = sorted(arrays)
    tf.raw_ops.SaveV2(prefix=str(directory / "model.ckpt"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[arrays[n] for n in names])
    (directory / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
    (directory / "hparams.json").write_text(json.dumps(hparams))
    tokenizer.save_gpt2(directory / "encoder.json", directory / "vocab.bpe")
    return directory


def hf_from_openai(transformers, arrays, hparams):
    """transformers.GPT2LMHeadModel holding OpenAI-layout arrays (HF's Conv1D is OpenAI's minus the 1)."""
    state = {}
    for name, array in arrays.items():
        name = re.sub(r"^h(\d+)/", r"h.\1/", name.removeprefix("model/")).replace("/", ".")
        name = re.sub(r"\.[gw]$", ".weight", re.sub(r"\.b$", ".bias", name))
        state["transformer." + (name + ".weight" if name in ("wte", "wpe") else name)] = torch.from_numpy(array[0] if array.ndim == 3 else array)
    config = transformers.GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
                                     n_layer=hparams["n_layer"], n_head=hparams["n_head"], bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    hf.tie_weights()
    return hf


@pytest.fixture(scope="module")
def openai_dir(tf, tmp_path_factory, tokenizer):
    return write_openai_dir(tf, tmp_path_factory.mktemp("openai") / "124M", openai_arrays(HPARAMS), HPARAMS, tokenizer)


def test_openai_import_matches_transformers(openai_dir, tmp_path, capsys, transformers, tokenizer):
    rc, _ = run_cli(capsys, "openai", openai_dir, tmp_path / "out")
    assert rc == 0
    model = GPT.from_pretrained(tmp_path / "out")
    assert model.config == GPTConfig(vocab_size=300, n_ctx=64, n_embd=32, n_layer=2, n_head=4)
    assert model.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert_parity(model, hf_from_openai(transformers, openai_arrays(HPARAMS), HPARAMS))


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({**HPARAMS, "n_embd": 48}, r"variable model/wte has shape \[300, 32\] but hparams.json .* implies \[300, 48\]"),
        ({**HPARAMS, "n_layer": 3}, "variable model/h2/attn/c_attn/w is missing"),
        ({**HPARAMS, "n_layer": 1}, "variable model/h1/.* is not part of a GPT-2 with hparams.json's n_layer=1"),
        ({k: v for k, v in HPARAMS.items() if k != "n_head"}, "hparams.json: missing n_head"),
    ],
)
def test_openai_hparams_disagreeing_with_tensors(openai_dir, tmp_path, capsys, hparams, message):
    src = shutil.copytree(openai_dir, tmp_path / "src")
    (src / "hparams.json").write_text(json.dumps(hparams))
    assert_cli_error(capsys, ["openai", src, tmp_path / "out"], message)
    assert not (tmp_path / "out").exists()


def test_openai_missing_variable_is_named(tf, tmp_path, capsys, tokenizer):
    arrays = openai_arrays(HPARAMS)
    del arrays["model/h1/mlp/c_proj/b"]
    src = write_openai_dir(tf, tmp_path / "src", arrays, HPARAMS, tokenizer)
    assert_cli_error(capsys, ["openai", src, tmp_path / "out"], "variable model/h1/mlp/c_proj/b is missing")


@pytest.mark.parametrize("name, message", [("vocab.bpe", "vocab.bpe: file not found"), ("model.ckpt.index", "no TensorFlow checkpoint found"),
                                           ("hparams.json", "hparams.json: file not found")])
def test_openai_missing_files(openai_dir, tmp_path, capsys, name, message):
    src = shutil.copytree(openai_dir, tmp_path / "src")
    (src / name).unlink()
    if name == "model.ckpt.index":
        (src / "checkpoint").unlink()
    assert_cli_error(capsys, ["openai", src, tmp_path / "out"], message)


def test_openai_without_tensorflow_says_how_to_install(openai_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    assert_cli_error(capsys, ["openai", openai_dir, tmp_path / "out"], r"needs TensorFlow.*pip install")


# --------------------------------------------------------------------------------------------- Hugging Face


def random_hf(transformers, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=299, eos_token_id=299, **overrides)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # transformers initialises LayerNorms to 1/0 and biases to 0: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def hf_dir(transformers, tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("hf") / "gpt2"
    random_hf(transformers).save_pretrained(directory)
    tokenizer.save_gpt2(directory / "vocab.json", directory / "merges.txt")
    return directory


@pytest.mark.parametrize("untied", [False, True])
def test_hf_import_matches_transformers(hf_dir, transformers, tmp_path, capsys, tokenizer, untied):
    src, hf = hf_dir, random_hf(transformers)
    if untied:
        src, hf = tmp_path / "untied", random_hf(transformers, seed=1, tie_word_embeddings=False)
        hf.save_pretrained(src)
        shutil.copy(hf_dir / "vocab.json", src)
        shutil.copy(hf_dir / "merges.txt", src)
    rc, _ = run_cli(capsys, "hf-import", src, tmp_path / "out")
    assert rc == 0
    model = GPT.from_pretrained(tmp_path / "out")
    assert model.config.tie_embeddings is not untied
    assert model.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert_parity(model, hf)


def test_hf_import_hub_layout(hf_dir, transformers, tmp_path, capsys):
    """Files on the Hub predate the "transformer." prefix and carry the causal-mask buffers."""
    src = shutil.copytree(hf_dir, tmp_path / "hub", ignore=shutil.ignore_patterns("*.safetensors"))
    hf = random_hf(transformers)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(state, src / "model.safetensors")
    rc, _ = run_cli(capsys, "hf-import", src, tmp_path / "out")
    assert rc == 0
    assert_parity(GPT.from_pretrained(tmp_path / "out"), hf)


def test_hf_import_pytorch_bin(hf_dir, transformers, tmp_path, capsys):
    src = shutil.copytree(hf_dir, tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    hf = random_hf(transformers)
    torch.save(hf.state_dict(), src / "pytorch_model.bin")
    rc, _ = run_cli(capsys, "hf-import", src, tmp_path / "out")
    assert rc == 0
    assert_parity(GPT.from_pretrained(tmp_path / "out"), hf)


def test_hf_import_refuses_bin_needing_pickle_code(hf_dir, tmp_path, capsys):
    src = shutil.copytree(hf_dir, tmp_path / "evil", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"weight": torch.zeros(1), "payload": print}, src / "pytorch_model.bin")  # a global, not a tensor
    assert_cli_error(capsys, ["hf-import", src, tmp_path / "out"], "refusing to load: this file needs pickle code execution")


def test_hf_import_tokenizer_option(hf_dir, tmp_path, capsys, tokenizer):
    src = shutil.copytree(hf_dir, tmp_path / "src", ignore=shutil.ignore_patterns("vocab.json", "merges.txt"))
    assert_cli_error(capsys, ["hf-import", src, tmp_path / "out"], "vocab.json: file not found; pass the tokenizer with --tokenizer FILE")
    tokenizer.save(tmp_path / "tokenizer.json")
    rc, _ = run_cli(capsys, "hf-import", src, tmp_path / "out", "--tokenizer", tmp_path / "tokenizer.json")
    assert rc == 0
    assert GPT.from_pretrained(tmp_path / "out").tokenizer.fingerprint() == tokenizer.fingerprint()


def test_hf_import_vocab_mismatch_names_both_sizes(hf_dir, tmp_path, capsys, text):
    tokenizers_bpe.train_from_iterator([text], 320, progress=False).save(tmp_path / "big.json")
    assert_cli_error(capsys, ["hf-import", hf_dir, tmp_path / "out", "--tokenizer", tmp_path / "big.json"], "has 320 tokens but the model's vocab_size is 300")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"activation_function": "relu"}, "activation_function='relu' is not GPT-2's architecture"),
        ({"model_type": "llama"}, "only GPT-2"),
        ({"n_positions": 128}, r"transformer.wpe.weight has shape \[64, 32\], but the config implies \[128, 32\]"),
    ],
)
def test_hf_import_bad_config(hf_dir, tmp_path, capsys, edit, message):
    src = shutil.copytree(hf_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    assert_cli_error(capsys, ["hf-import", src, tmp_path / "out"], message)


def test_hf_import_missing_weights(hf_dir, tmp_path, capsys):
    src = shutil.copytree(hf_dir, tmp_path / "src", ignore=shutil.ignore_patterns("*.safetensors"))
    assert_cli_error(capsys, ["hf-import", src, tmp_path / "out"], "no model.safetensors or pytorch_model.bin")


@pytest.mark.parametrize("overrides", [{}, {"bias": False, "tie_embeddings": False}])
def test_hf_export_loads_in_transformers_without_warnings(transformers, tmp_path, capsys, tokenizer, overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300, **overrides)).eval()
    model.save_pretrained(tmp_path / "ours", tokenizer=tokenizer)
    rc, _ = run_cli(capsys, "hf-export", tmp_path / "ours", tmp_path / "hf")
    assert rc == 0

    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info
    assert [r.getMessage() for r in records] == []
    assert_parity(model, hf.eval())
    hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


def test_hf_export_folds_lora_adapters_in(transformers, tmp_path, capsys, tokenizer):
    from gpt.lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig.from_preset("tiny", vocab_size=300)), LoRAConfig(rank=2, targets=("attn",))).eval()
    with torch.no_grad():  # a trained-looking adapter, so that leaving it out would change the logits
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "lora", tokenizer=tokenizer)
    rc, _ = run_cli(capsys, "hf-export", tmp_path / "lora", tmp_path / "hf")
    assert rc == 0
    assert_parity(model, transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval())


def test_hf_export_refuses_rope(tmp_path, capsys, tokenizer):
    GPT(GPTConfig.from_preset("tiny", vocab_size=300, pos_embedding="rope")).save_pretrained(tmp_path / "ours", tokenizer=tokenizer)
    assert_cli_error(capsys, ["hf-export", tmp_path / "ours", tmp_path / "hf"], "a 'rope' model cannot be exported")


def test_convert_never_deletes_a_directory_holding_other_files(tmp_path, capsys, tokenizer):
    GPT(GPTConfig.from_preset("tiny", vocab_size=300)).save_pretrained(tmp_path / "ours", tokenizer=tokenizer)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("precious")
    assert_cli_error(capsys, ["hf-export", tmp_path / "ours", project], r"project already exists and holds train\.py")
    assert [p.name for p in project.iterdir()] == ["train.py"]


def test_hf_export_bad_checkpoint(tmp_path, capsys):
    assert_cli_error(capsys, ["hf-export", tmp_path / "missing", tmp_path / "hf"], "no such checkpoint directory")


def test_usage_errors(capsys):
    assert main(["--help"]) == 0
    assert_cli_error(capsys, [], "required: COMMAND")
    assert_cli_error(capsys, ["hf-import", "only-one-arg"], "required: OUT")


def test_hf_import_refuses_a_merges_txt_cut_short_and_takes_only_named_special_tokens(hf_dir, tmp_path, capsys):
    """Every vocab.json entry no merge produced became a special token: a merges.txt cut short imported
    with exit 0 as a tokenizer of 143 "special tokens" ('Ġt', 'he', ...) that refused ordinary text."""
    src = shutil.copytree(hf_dir, tmp_path / "src")
    lines = (src / "merges.txt").read_text().splitlines()
    (src / "merges.txt").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    assert_cli_error(capsys, ["hf-import", src, tmp_path / "out"], r"vocab.json: \d+ entries that no merge of .*merges.txt "
                                                                    r"produces .*; is merges.txt cut short\?")
    assert not (tmp_path / "out").exists()
    shutil.copy(hf_dir / "merges.txt", src)
    vocab = json.loads((src / "vocab.json").read_text())
    vocab["<|pad|>"] = vocab.pop("<|endoftext|>")  # a special token of another name: it must be named
    (src / "vocab.json").write_text(json.dumps(vocab))
    assert_cli_error(capsys, ["hf-import", src, tmp_path / "out"], r"1 entry that no merge .*\('<\|pad\|>' \(299\)\)")
    (src / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|pad|>", "special": True}}))
    rc, _ = run_cli(capsys, "hf-import", src, tmp_path / "out")
    assert rc == 0
    assert GPT.from_pretrained(tmp_path / "out").tokenizer.special_tokens == {"<|pad|>": 299}
