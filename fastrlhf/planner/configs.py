"""Model configurations for the memory planner: a local directory / config.json, or a public model
by name from the catalog below (facts from each model's published config.json, so the planner
works offline). Only the architecture fields that decide memory are kept.

    config = load_config("Qwen2.5-7B")          # catalog name (case-insensitive)
    config = load_config("path/to/model_dir")   # or path/to/config.json
"""
from __future__ import annotations

import copy
import json
import os

_QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
         "use_sliding_window": False, "torch_dtype": "bfloat16"}
_LLAMA31 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "vocab_size": 128256, "torch_dtype": "bfloat16"}
_SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": True, "vocab_size": 49152, "torch_dtype": "bfloat16"}


def _model(base: dict, **fields) -> dict:
    return {**base, **fields}


# name -> config.json values (hidden size, MLP width, layers, query / key-value heads, vocabulary, tying)
CATALOG: dict[str, dict] = {
    "Qwen2.5-0.5B": _model(_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": _model(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-3B": _model(_QWEN, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": _model(_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-14B": _model(_QWEN, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                          num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-32B": _model(_QWEN, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                          num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-72B": _model(_QWEN, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Llama-3.1-8B": _model(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8),
    "Llama-3.1-70B": _model(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8),
    "SmolLM2-135M": _model(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "SmolLM2-1.7B": _model(_SMOLLM2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                           num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0),
}
# The Qwen2 shape of the committed H200 e2e rows (benchmarks/e2e.py): Qwen2-0.5B, 4096 positions.
CATALOG["Qwen2-0.5B"] = _model(CATALOG["Qwen2.5-0.5B"], max_position_embeddings=4096)

# Sizes of the headline table, smallest first.
HEADLINE_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B",
                   "Qwen2.5-32B", "Qwen2.5-72B")

REQUIRED_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")


class ConfigError(ValueError):
    """A model configuration the planner cannot build (message names the field or the source)."""


def catalog_names() -> list[str]:
    return list(CATALOG)


def _catalog_key(name: str) -> str | None:
    wanted = name.lower().split("/")[-1].removesuffix("-instruct")
    for key in CATALOG:
        if key.lower() == wanted:
            return key
    return None


def load_config_dict(source: str) -> tuple[dict, str]:
    """(config.json values, a short name) from a catalog name, a model directory or a config.json."""
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"model must be a catalog name ({', '.join(CATALOG)}), a model directory or a "
                          f"config.json path, got {source!r}")
    path = source
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{source!r} is a directory without a config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read {path!r} as JSON: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path!r} must hold a JSON object, got {type(values).__name__}")
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
        return values, name
    key = _catalog_key(source)
    if key is None:
        raise ConfigError(f"model {source!r} is neither a local directory, a config.json nor a catalog name; "
                          f"known: {', '.join(CATALOG)}")
    return copy.deepcopy(CATALOG[key]), key


def load_config(source: str):
    """A transformers config (its class from model_type) -> (config, name). ConfigError naming the
    missing or bad field, or the unknown architecture."""
    values, name = load_config_dict(source)
    return config_from_dict(values, source=source), name


def config_from_dict(values: dict, *, source: str = "config"):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    # text part of multimodal configs
    if "text_config" in values and "hidden_size" not in values and isinstance(values["text_config"], dict):
        values = {**values["text_config"], "model_type": values["text_config"].get("model_type", values.get("model_type"))}
    for name in REQUIRED_FIELDS:
        if name not in values:
            raise ConfigError(f"{source}: missing field {name!r} (the planner needs {', '.join(REQUIRED_FIELDS)})")
    for name in REQUIRED_FIELDS[1:]:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    model_type = values.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if k not in ("transformers_version",)})
    except (ValueError, KeyError) as error:
        raise ConfigError(f"{source}: unknown architecture model_type={model_type!r} ({error})") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ConfigError(f"{source}: model_type={model_type!r} has no causal-LM class in transformers "
                          f"(architectures={values.get('architectures')})")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % kv:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        raise ConfigError(f"{source}: hidden_size={config.hidden_size} is not a multiple of "
                          f"num_attention_heads={heads} (and no head_dim is given)")
    return config


def with_layers(config, n_layers: int):
    """A copy of `config` with `n_layers` decoder layers; per-layer lists (layer_types, ...) cut to
    their first n entries."""
    total = config.num_hidden_layers
    values = config.to_dict()
    for key, value in values.items():
        if isinstance(value, (list, tuple)) and len(value) == total and key != "architectures":
            values[key] = list(value)[:n_layers]
    values["num_hidden_layers"] = n_layers
    if isinstance(values.get("max_window_layers"), int):
        values["max_window_layers"] = min(values["max_window_layers"], n_layers)
    out = type(config).from_dict(values)
    out._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return out


def parameter_count(config) -> int:
    """Parameters of the causal LM built from `config` (counted on the meta device: exact)."""
    import torch

    from fastrlhf.planner.fake import build_meta_causal_lm

    model = build_meta_causal_lm(config, torch.bfloat16)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
