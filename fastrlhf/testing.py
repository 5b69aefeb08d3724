"""Tiny offline models and tokenizers for tests, examples and benchmarks (no hub, seconds on CPU).

    from fastrlhf.testing import tiny_llama, tiny_tokenizer
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), tie=True)

`tiny_tokenizer()` is a lower-cased word-level tokenizer over `TINY_WORDS` (unknown words -> "<unk>")
with a ChatML chat template, the same template family as SmolLM2-Instruct, so chat-template code
paths (prompt masking, generation prompts) run exactly as with the real model.
"""
from __future__ import annotations

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>")

# Small closed vocabulary: chat roles, digits, punctuation and common words, enough for toy tasks
# ("answer with yes", "count to three", ...). Everything is lower-cased before lookup.
TINY_WORDS = (
    "system user assistant "
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ' - "
    "a an the is are was be to of and or not no yes in on at for with by from as it this that "
    "what which who how why when where i you he she we they my your me "
    "one two three four five six seven eight nine ten "
    "red green blue black white big small good bad happy sad cat dog bird fish sun moon "
    "say answer question word words end start count please short long only use capital "
    "france paris city country water fire hello hi bye thanks ok"
).split()

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(*, chat_template: bool = True):
    """A `PreTrainedTokenizerFast` over `SPECIAL_TOKENS + TINY_WORDS` (118 ids), built offline.

    pad = "<pad>" (id 0), unk = "<unk>", bos = "<s>", eos = "<|im_end|>" (as in SmolLM2-Instruct).
    `chat_template=False` gives the same tokenizer without a chat template (plain-text code paths).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *TINY_WORDS):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE if chat_template else None,
    )
    return tokenizer


def tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 32,
    *,
    tie: bool = False,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    seed: int = 0,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 4,
):
    """A randomly initialised `LlamaForCausalLM` (float32, sdpa attention, eval mode).

    Token ids default to those of `tiny_tokenizer()`. `tie=True` ties lm_head to the embeddings
    (as SmolLM2 does). The same `seed` gives the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()


def save_tiny_model(path) -> str:
    """Save a tiny tied Llama and its ChatML tokenizer to `path` as a Hugging Face model directory
    (what `--model PATH` and `load_causal_lm(path)` read). Returns the path as a string."""
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), tie=True).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
