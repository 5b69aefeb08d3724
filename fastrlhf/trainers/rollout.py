"""Rollout generation behind a small interface, so another engine (e.g. vLLM on GPU machines) can plug in.

An engine turns prompt token ids into completion token ids; everything else (padding, masks,
log-probs, rewards) is done by the trainer on the result, so the engine needs no knowledge of
the model roles:

    engine = HFGenerateEngine(role_model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              max_new_tokens=64, temperature=1.0)
    completions = engine.generate([[12, 7, 9], [5, 3]])     # list of token-id lists, EOS included
    batch = build_rollout_batch(prompts, completions, pad_token_id=tok.pad_token_id)

A vLLM engine would implement `generate` and copy the policy weights into its own copy before each
rollout; that weight sync is the engine's business.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """One completion per prompt: its generated token ids, without padding, ending with the first
        EOS token when generation stopped there (nothing after it)."""
        ...


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def cut_at_eos(tokens: Sequence[int], eos_token_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS (all of them when there is none)."""
    out: list[int] = []
    for token in tokens:
        out.append(int(token))
        if token in eos_token_ids:
            break
    return out


class HFGenerateEngine:
    """Sampling with Hugging Face `generate` through `RoleModel.generate` (policy role, no grad).

    Prompts are left-padded into one batch (or chunks of `batch_size`); generation stops per row at
    the first EOS (`eos_token_id`, an id or a list of ids) or after `max_new_tokens`.
    do_sample=False gives greedy decoding (temperature/top_k/top_p are then ignored).
    top_k=0 and top_p=1.0 disable those filters.
    """

    def __init__(
        self,
        model,
        *,
        eos_token_id: int | Sequence[int],
        pad_token_id: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        do_sample: bool = True,
        batch_size: int | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        self.model = model
        self.eos_token_ids = _eos_set(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.batch_size = batch_size
        self.max_new_tokens = int(max_new_tokens)
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        # on_progress(tokens generated so far, max_new_tokens): called after every decoding step
        # (the trainer shows it on its progress bar; generation is most of an RL iteration's time)
        self.on_progress = None

    def generation_kwargs(self) -> dict:
        """Every sampling option spelled out, so the model's own generation_config.json (e.g. top_k=50,
        a low temperature or a repetition penalty) never silently changes the sampling distribution
        that the PPO ratio assumes."""
        eos = sorted(self.eos_token_ids)
        kwargs = dict(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=1,
            eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=self.pad_token_id,
            repetition_penalty=1.0, no_repeat_ngram_size=0,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs

    def _with_progress(self, kwargs: dict, prompt_width: int) -> dict:
        if self.on_progress is None:
            return kwargs
        return {**kwargs, "stopping_criteria": _progress_criteria(self.on_progress, prompt_width, self.max_new_tokens)}

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        size = self.batch_size or max(len(prompt_ids), 1)
        kwargs = self.generation_kwargs()
        out: list[list[int]] = []
        for start in range(0, len(prompt_ids), size):
            chunk = prompt_ids[start : start + size]
            input_ids, attention_mask = left_pad(chunk, self.pad_token_id, device=self._device())
            sequences = self.model.generate(input_ids, attention_mask, **self._with_progress(kwargs, input_ids.shape[1]))
            new_tokens = sequences[:, input_ids.shape[1] :].tolist()
            out.extend(cut_at_eos(row, self.eos_token_ids) for row in new_tokens)
        return out


class HFGenerateEngineWithLogprobs(HFGenerateEngine):
    """`HFGenerateEngine` that also reports the log-prob the sampler gave each generated token, as
    vLLM / SGLang engines do: what the rollout IS corrections (`ppo_loss(is_correction=...)`) compare
    with the trainer's own log-probs. From `generate`'s processed scores, i.e. the distribution it
    actually sampled from (after temperature, top-k, top-p). Costs the [B, new, V] scores in memory."""

    @torch.no_grad()
    def generate_with_logprobs(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """(completions as `generate` returns them, per completion token its sampling log-prob)."""
        size = self.batch_size or max(len(prompt_ids), 1)
        kwargs = dict(self.generation_kwargs(), output_scores=True, return_dict_in_generate=True)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        for start in range(0, len(prompt_ids), size):
            chunk = prompt_ids[start : start + size]
            input_ids, attention_mask = left_pad(chunk, self.pad_token_id, device=self._device())
            out = self.model.generate(input_ids, attention_mask, **self._with_progress(kwargs, input_ids.shape[1]))
            new_tokens = out.sequences[:, input_ids.shape[1] :]
            scores = torch.stack(out.scores, dim=1).float()  # [B, new, V]
            token_logps = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens[..., None]).squeeze(-1)
            for row, row_logps in zip(new_tokens.tolist(), token_logps.tolist()):
                completion = cut_at_eos(row, self.eos_token_ids)
                completions.append(completion)
                logprobs.append(row_logps[: len(completion)])
        return completions, logprobs


def _progress_criteria(callback, prompt_width: int, max_new_tokens: int):
    """A transformers StoppingCriteria that never stops generation and reports how many tokens are
    done after each decoding step (the hook generate offers at that point)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ReportProgress(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            callback(input_ids.shape[1] - prompt_width, max_new_tokens)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([ReportProgress()])


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` `[B, T]` (the layout `generate` expects)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def build_rollout_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    device=None,
) -> dict[str, torch.Tensor]:
    """Pack prompt + completion rows RIGHT-padded for the scoring and training forwards.

    Returns `input_ids`, `attention_mask` `[B, T]` and `response_mask` `[B, T-1]`, the latter aligned
    with token log-probs (position t scores token t+1), 1 on completion tokens (EOS included), plus
    `last_index` `[B]`, the position in that `[B, T-1]` frame of each row's last completion token
    (where the sequence-level reward is added), and `response_length` `[B]`.
    Right padding gives every row positions 0..len-1, the same as the unpadded sequence, whichever
    padding the generation engine used.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(max(lengths, default=0), 2)
    B = len(prompt_ids)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    response_mask = torch.zeros((B, width - 1), dtype=torch.float32)
    last_index = torch.zeros(B, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        if not len(prompt):
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        row = list(prompt) + list(completion)
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        if completion:
            # token j of the row is predicted at logps position j - 1
            response_mask[i, len(prompt) - 1 : len(row) - 1] = 1
            last_index[i] = len(row) - 2
    response_length = response_mask.sum(-1)
    to = dict(device=device)
    return {
        "input_ids": input_ids.to(**to),
        "attention_mask": attention_mask.to(**to),
        "response_mask": response_mask.to(**to),
        "last_index": last_index.to(**to),
        "response_length": response_length.to(**to),
    }
