"""Will a training micro-batch fit? A lower bound of its memory, checked against what the machine
has before any work starts: on a CPU the OS kills a process that runs out of memory (or swaps for
hours) instead of raising an error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt.device import resolve_device, resolve_dtype
from gpt2_kernels.memory_plan import recompute_gelu
from tokenizers_bpe import membudget
from tokenizers_bpe.errors import SettingError


def available_memory_bytes() -> int | None:
    """Memory this process can still get (tokenizers_bpe.membudget.available_memory: the machine's, or
    its memory cgroup's where that is less); None where unknown. The seam the commands' checks (and
    tests) use."""
    return membudget.available_memory()


def micro_batch_bytes(n_layer: int, n_embd: int, vocab_size: int, batch_size: int, block_size: int, dtype: torch.dtype) -> int:
    """A lower bound of the memory one language-model training micro-batch takes beyond the weights:
    per token, the windows (int64 inputs and targets), 10 x n_embd activations per layer kept for the
    backward pass (LayerNorm inputs and outputs, q/k/v, attention output, the 4x MLP input of the GELU),
    4 x n_embd more where gpt2_kernels.gelu_linear keeps the GELU's output rather than recomputing it
    (gpt2_kernels.memory_plan.recompute_gelu: small batches), and the gradient of the final hidden
    state that the fused output layer + loss keeps (gpt2_kernels.linear_cross_entropy: no logits are
    kept), plus that op's gradient of the output weight (vocab_size x n_embd, once per micro-batch).
    A lower bound (autograd keeps a little more, and the backward pass adds gradients), so it never
    refuses a batch that would fit."""
    tokens = batch_size * block_size
    activation_size = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    per_layer = 10 if recompute_gelu(tokens * 4 * n_embd, dtype) else 14
    return tokens * (16 + (n_layer * per_layer + 1) * n_embd * activation_size) + vocab_size * n_embd * activation_size


@dataclass(frozen=True)
class MicroBatchMemory:
    """A micro-batch's memory lower bound next to the memory available for it, in bytes."""

    need: int
    available: int

    @property
    def tight(self) -> bool:
        """The bound alone takes more than half the memory: the real peak (higher) may not fit."""
        return self.need > self.available / 2


def training_state_bytes(trained_parameters: int, unbuilt_parameters: int = 0) -> int:
    """The memory training takes for the parameters beyond what is allocated now: for each trained one
    a fp32 gradient and AdamW's two fp32 moments (allocated at the first step), and the fp32 weights
    of a model not built yet (a built model's are in memory, out of the available memory already)."""
    return trained_parameters * 12 + unbuilt_parameters * 4


def check_micro_batch_fits(n_layer: int, n_embd: int, vocab_size: int, batch_size: int, block_size: int, device: str,
                           dtype: str, state_bytes: int = 0) -> MicroBatchMemory | None:
    """On a CPU, refuse, before any work starts, training that cannot fit in the available memory: a
    ValueError when the parameters' training state (``state_bytes``, see training_state_bytes) alone
    cannot, else a SettingError on ``batch_size`` when a micro-batch cannot fit beside it. CUDA raises
    an out-of-memory error cleanly, which the Trainer turns into the same advice, so there (and where
    the available memory is unknown) this checks nothing and returns None; otherwise it returns the
    estimate, so that the caller can warn when it is ``tight``. ``device`` and ``dtype`` are the
    settings' values (may be "auto")."""
    device = resolve_device(device)
    available = available_memory_bytes()
    if device.startswith("cuda") or available is None:
        return None
    if state_bytes > available:
        raise ValueError(f"training this model needs at least {state_bytes / 2**30:,.1f} GiB more (the gradients and AdamW "
                         f"state of the parameters it trains, and its weights if not loaded yet) but {available / 2**30:,.1f} GiB "
                         "of memory is available; train a smaller model or fewer of its parameters (gpt-finetune --lora-rank)")
    need = micro_batch_bytes(n_layer, n_embd, vocab_size, batch_size, block_size, resolve_dtype(dtype, device)) + state_bytes
    if need > available:
        beside = f" (with {state_bytes / 2**30:,.1f} GiB for the weights' training state)" if state_bytes else ""
        raise SettingError("batch_size", f"a micro-batch of {{batch_size}} {batch_size} x {{block_size}} {block_size} needs at least "
                           f"{need / 2**30:,.1f} GiB{beside} but {available / 2**30:,.1f} GiB of memory is available; "
                           f"{SMALLER_BATCH_ADVICE}")
    return MicroBatchMemory(need, available)


def check_model_fits(config, bytes_per_parameter: int = 4, what: str = "model config") -> int:
    """A ValueError naming the model's size when its weights alone (``config.num_parameters()`` x
    ``bytes_per_parameter``) need more than the memory available, checked before a model is built or
    loaded (a CPU process that runs out is killed by the OS, not given an error). Returns the bytes."""
    need = config.num_parameters() * bytes_per_parameter
    available = available_memory_bytes()
    if available is not None and need > available:
        c = config
        raise ValueError(f"{what}: a model of {c.n_layer} layers, {c.n_embd} wide, context {c.n_ctx} and {c.vocab_size:,} tokens "
                         f"has {config.num_parameters():,} parameters, whose weights need {need / 2**30:,.1f} GiB, but "
                         f"{available / 2**30:,.1f} GiB of memory is available")
    return need


def generation_bytes(config, num_samples: int, positions: int, bytes_per_value: int) -> int:
    """A lower bound of the memory decoding ``num_samples`` rows takes beyond the weights: the keys and
    values of ``positions`` positions in every layer, and per row a few vocabulary-sized fp32 rows
    (logits, probabilities) and the repetition marks."""
    cache = 2 * config.n_layer * (positions + 1) * config.n_embd * bytes_per_value
    return num_samples * (cache + config.vocab_size * (3 * 4 + 1) + config.n_ctx * 8)


def check_generation_fits(config, num_samples: int, positions: int, bytes_per_value: int, device: str) -> None:
    """A SettingError on ``num_samples`` when decoding that many rows cannot fit in the memory left
    (the CPU's available memory; a GPU's free memory) before any of it is allocated."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        available = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        available = available_memory_bytes()
    need = generation_bytes(config, num_samples, positions, bytes_per_value)
    if available is not None and need > available:
        raise SettingError("num_samples", f"{{num_samples}} {num_samples} needs at least {need / 2**30:,.1f} GiB for decoding "
                                          f"but {available / 2**30:,.1f} GiB of memory is available; lower {{num_samples}}")


SMALLER_BATCH_ADVICE = "lower {batch_size} (raise {grad_accum} to keep the batch) or {block_size}"
