"""What PPO and GRPO share: rollouts, scoring, log-probs, and the clipped policy update.

One loop step ("iteration") = take `batch_size` prompts -> generate -> score -> build the experience
(advantages, old / reference log-probs; subclass) -> `ppo_epochs` passes over shuffled minibatches,
one optimizer step per minibatch (each split into `grad_accum_steps` micro-batches).
One JSON line per iteration in metrics.jsonl (metrics averaged over its optimizer steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastrlhf
from fastrlhf._checks import check_choice, check_int, check_number
from fastrlhf.contracts import IS_CORRECTIONS, KL_ESTIMATORS, LOSS_AGGS, TRAINER_LOSS_TYPES
from fastrlhf.data import eos_token_ids
from fastrlhf.distributed import DistContext, global_masked_mean_var
from fastrlhf.options import option_help, unset_as_none
from fastrlhf.trainers.base import Trainer
from fastrlhf.trainers.config import TrainerConfig
from fastrlhf.trainers.kl_control import FixedKLController
from fastrlhf.trainers.rollout import HFGenerateEngineWithLogprobs, build_rollout_batch


@dataclass
class PolicyGradientConfig(TrainerConfig):
    batch_size: int = field(default=8, metadata=option_help(
        "prompts per device per iteration (GRPO samples each group_size times)"))
    max_prompt_length: int = field(default=256, metadata=option_help("prompts longer than this keep their last tokens (with a warning)"))
    max_new_tokens: int = field(default=64, metadata=option_help("max generated tokens per completion (generation stops at EOS)"))
    temperature: float = field(default=1.0, metadata=option_help("sampling temperature (log-probs are computed at the same temperature)"))
    top_k: int = field(default=0, metadata=option_help("sample from the k most likely tokens; 0 = off"))
    top_p: float = field(default=1.0, metadata=option_help("nucleus sampling probability mass; 1.0 = off"))
    ppo_epochs: int = field(default=1, metadata=option_help("passes over each batch of experience"))
    num_minibatches: int = field(default=1, metadata=option_help("optimizer steps per pass over the experience"))
    clip_eps: float = field(default=0.2, metadata=option_help("PPO ratio clip range: [1 - clip_eps, 1 + clip_eps_high]"))
    clip_eps_high: float | None = field(default=None, metadata=option_help(
        "upper clip range (DAPO clip-higher); none = same as clip_eps (0, which older versions wrote, is read as none)"))
    dual_clip: float | None = field(default=None, metadata=option_help(
        "dual-clip constant c > 1 for negative advantages; none = off (0, which older versions wrote, is read as none)"))
    entropy_coef: float = field(default=0.0, metadata=option_help("entropy bonus weight"))
    loss_agg: str = field(default="token-mean", metadata=option_help(f"policy loss aggregation: {', '.join(LOSS_AGGS)}"))
    kl_coef: float = field(default=0.05, metadata=option_help("KL-to-reference coefficient (initial value when adaptive)"))
    kl_estimator: str = field(default="k1", metadata=option_help("KL estimator: k1 (log-ratio), k2, k3 (Schulman)"))
    missing_eos_penalty: float = field(default=0.0, metadata=option_help(
        "subtracted from the score of completions that hit max_new_tokens without EOS"))
    loss_type: str = field(default="ppo", metadata=option_help(
        f"policy objective: {', '.join(TRAINER_LOSS_TYPES)} (gspo = sequence-level ratio)"))
    sapo_tau_pos: float = field(default=1.0, metadata=option_help("sapo: gate temperature for positive advantages"))
    sapo_tau_neg: float = field(default=1.05, metadata=option_help("sapo: gate temperature for other advantages"))
    is_correction: str | None = field(default=None, metadata=option_help(
        f"rollout/trainer mismatch correction with the engine's log-probs: {', '.join(IS_CORRECTIONS)}; none = off"))
    is_clip_min: float | None = field(default=None, metadata=option_help("IS weight lower bound; none = no lower bound"))
    is_clip_max: float = field(default=2.0, metadata=option_help("IS weight upper bound"))
    top_entropy_quantile: float = field(default=1.0, metadata=option_help(
        "train the policy term on the top fraction of tokens by entropy only; 1.0 = all tokens"))
    per_device_train_batch_size: int | None = field(default=None, metadata=option_help(
        "TRL's meaning: completions per device per micro-batch; sets batch_size (prompts per iteration) = this x "
        "grad_accum_steps x num_minibatches / samples per prompt; none = use batch_size"))
    reward_weights: list[float] | None = field(default=None, metadata=option_help(
        "weights of the reward functions / models, one each (TRL's reward_weights); none = all 1.0"))
    log_completions_steps: int = field(default=0, metadata=option_help(
        "every N iterations, write sample prompts, completions and rewards to OUTPUT_DIR/completions.jsonl "
        "and the report_to loggers; 0 = never"))
    num_completions_to_print: int = field(default=4, metadata=option_help("samples per log_completions_steps entry"))

    def samples_per_prompt(self) -> int:
        """Completions sampled per prompt (GRPO: group_size)."""
        return 1

    def validate(self) -> None:
        super().validate()
        check_int("max_prompt_length", self.max_prompt_length, 1)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_int("top_k", self.top_k, 0)
        check_number("top_p", self.top_p, low=0, high=1, low_open=True)
        check_int("ppo_epochs", self.ppo_epochs, 1)
        check_int("num_minibatches", self.num_minibatches, 1)
        check_number("clip_eps", self.clip_eps, low=0, low_open=True)
        self.clip_eps_high = unset_as_none(self.clip_eps_high)
        if self.clip_eps_high is not None:
            check_number("clip_eps_high", self.clip_eps_high, low=0, low_open=True)
        self.dual_clip = unset_as_none(self.dual_clip)
        if self.dual_clip is not None:
            check_number("dual_clip", self.dual_clip, low=1, low_open=True)
        check_number("entropy_coef", self.entropy_coef, low=0)
        check_choice("loss_agg", self.loss_agg, LOSS_AGGS)
        check_number("kl_coef", self.kl_coef, low=0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_number("missing_eos_penalty", self.missing_eos_penalty, low=0)
        check_choice("loss_type", self.loss_type, tuple(TRAINER_LOSS_TYPES))
        check_number("sapo_tau_pos", self.sapo_tau_pos, low=0, low_open=True)
        check_number("sapo_tau_neg", self.sapo_tau_neg, low=0, low_open=True)
        self.is_correction = unset_as_none(self.is_correction)
        if self.is_correction is not None:
            check_choice("is_correction", self.is_correction, IS_CORRECTIONS)
        self.is_clip_min = unset_as_none(self.is_clip_min)
        if self.is_clip_min is not None:
            check_number("is_clip_min", self.is_clip_min, low=0)
        check_number("is_clip_max", self.is_clip_max, low=self.is_clip_min or 0, low_open=True)
        check_number("top_entropy_quantile", self.top_entropy_quantile, low=0, high=1)
        if self.reward_weights is not None:
            from fastrlhf.cli import float_list

            try:
                self.reward_weights = float_list(self.reward_weights)
            except ValueError:
                raise ValueError(f"reward_weights must be a list of numbers, got {self.reward_weights!r}") from None
            if not self.reward_weights:
                raise ValueError("reward_weights must be a non-empty list of numbers or none")
            for w in self.reward_weights:
                check_number("reward_weights", w)
        self.per_device_train_batch_size = unset_as_none(self.per_device_train_batch_size)
        if self.per_device_train_batch_size is not None:
            check_int("per_device_train_batch_size", self.per_device_train_batch_size, 1)
            completions = self.per_device_train_batch_size * self.grad_accum_steps * self.num_minibatches
            if completions % max(self.samples_per_prompt(), 1):
                raise ValueError(
                    f"per_device_train_batch_size x grad_accum_steps x num_minibatches = {completions} completions must be "
                    f"a multiple of the {self.samples_per_prompt()} samples per prompt (num_generations)")
            self.batch_size = completions // max(self.samples_per_prompt(), 1)
        check_int("log_completions_steps", self.log_completions_steps, 0)
        check_int("num_completions_to_print", self.num_completions_to_print, 1)
        if self.dual_clip and self.loss_type != "ppo":
            raise ValueError(f"dual_clip applies to loss_type ppo only, got loss_type={self.loss_type!r}")


class PolicyGradientTrainer(Trainer):
    """Base of PPOTrainer and GRPOTrainer (prompt records {"prompt", ...}; extra fields reach reward_fn).

    reward_fn(prompts, completions, records) -> list[float]: prompts are the records' "prompt"
    strings (the chat-rendered prompt text when the prompt is a message list), completions the
    decoded generations (special tokens dropped), records the prompt records. Without reward_fn the
    model's "reward" role scores the full sequence at its last token.
    rollout_engine: any `RolloutEngine` (default: HF generate on the policy role).
    """

    data_kind = "prompt"
    samples_per_prompt = 1

    def __init__(self, *args, rollout_engine=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        generation_config = getattr(getattr(self.model, "causal_lm", None), "generation_config", None)
        self.eos_ids = eos_token_ids(self.tokenizer, generation_config)
        self.engine = rollout_engine or HFGenerateEngineWithLogprobs(
            self.model, eos_token_id=self.eos_ids, pad_token_id=self.pad_token_id,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        )
        if callable(getattr(self.reward_fn, "to", None)):  # reward models among the reward functions
            self.reward_fn.to(self.device)
        if hasattr(self.engine, "on_progress"):
            self.engine.on_progress = self._show_generation_progress
        self._generating = 0
        if cfg.is_correction is not None and not hasattr(self.engine, "generate_with_logprobs"):
            raise ValueError(
                f"is_correction={cfg.is_correction!r} needs a rollout engine that reports the sampled tokens' "
                f"log-probs (generate_with_logprobs); {type(self.engine).__name__} does not"
            )
        # The KL coefficient has one holder: fixed at kl_coef here, PPO's adaptive controller when
        # asked. Reward shaping, loss and the logged kl_coef read kl_ctl.value, which only moves
        # between iterations (after_update), so it is the same number for a whole iteration.
        self.kl_ctl = FixedKLController(cfg.kl_coef)
        self.kl_in_loss = True  # PPO with kl_in_reward: False, the KL shapes the rewards instead

    # ------------------------------------------------------------------ config / data
    def _check_roles(self) -> None:
        super()._check_roles()
        if self.reward_fn is None and "reward" not in self.model_roles():
            raise ValueError(f"{type(self).__name__} needs a reward: pass reward_fn=... or a RoleModel with the 'reward' role")
        if self.reward_fn is not None and not callable(self.reward_fn):
            raise ValueError(f"reward_fn must be callable, got {type(self.reward_fn).__name__}")

    def prepare(self, records):
        from fastrlhf.data import tokenize_prompts

        return tokenize_prompts(records, self.tokenizer, max_prompt_length=self.config.max_prompt_length)

    def check_config_against_data(self) -> None:
        cfg = self.config
        rows = cfg.batch_size * self.samples_per_prompt
        if rows < cfg.num_minibatches * cfg.grad_accum_steps:
            raise ValueError(
                f"num_minibatches x grad_accum_steps = {cfg.num_minibatches * cfg.grad_accum_steps} exceeds the "
                f"{rows} completions per iteration (batch_size x samples per prompt)"
            )

    def micro_batches_per_step(self) -> int:
        return 1  # one batch of prompts per iteration

    def optimizer_steps_per_step(self) -> int:
        return self.config.ppo_epochs * self.config.num_minibatches

    # ------------------------------------------------------------------ rollout and scoring
    @torch.no_grad()
    def rollout(self, prompts: list[dict], repeat: int = 1) -> dict:
        """Generate `repeat` completions per prompt (consecutive rows) -> right-padded batch dict with
        input_ids, attention_mask [B, T], response_mask [B, T-1], last_index, response_length [B],
        plus "completion_ids" and "examples" (python lists)."""
        examples = [ex for ex in prompts for _ in range(repeat)]
        prompt_ids = [ex["input_ids"] for ex in examples]
        self._generating = len(prompt_ids)
        self.metrics_log.set_activity(f"generating {len(prompt_ids)} completions", force=True)
        if self.config.is_correction is not None:
            completions, sampled_logps = self.engine.generate_with_logprobs(prompt_ids)
        else:
            completions, sampled_logps = self.engine.generate(prompt_ids), None
        self.metrics_log.set_activity("scoring the completions", force=True)
        batch = build_rollout_batch(prompt_ids, completions, pad_token_id=self.pad_token_id, device=self.device)
        if sampled_logps is not None:  # "rollout_logps" [B, T-1], aligned with response_mask
            rollout_logps = torch.zeros_like(batch["response_mask"])
            for i, (prompt, logps) in enumerate(zip(prompt_ids, sampled_logps)):
                rollout_logps[i, len(prompt) - 1 : len(prompt) - 1 + len(logps)] = torch.as_tensor(logps)
            batch["rollout_logps"] = rollout_logps
        eos = set(self.eos_ids)
        batch["has_eos"] = torch.tensor([bool(c) and c[-1] in eos for c in completions], device=self.device)
        batch["completion_ids"] = completions
        batch["examples"] = examples
        return batch

    @torch.no_grad()
    def score(self, batch: dict) -> torch.Tensor:
        """[B] float32 sequence scores: reward_fn, else the reward role at the last token; minus
        missing_eos_penalty where generation hit max_new_tokens."""
        if self.reward_fn is not None:
            examples = batch["examples"]
            prompts = [ex["prompt"] if isinstance(ex.get("prompt"), str) else ex["prompt_text"] for ex in examples]
            completions = self.tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
            records = [{k: v for k, v in ex.items() if k not in ("input_ids", "prompt_text")} for ex in examples]
            values = self.reward_fn(prompts, completions, records)
            try:
                scores = torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)
            except (TypeError, ValueError) as error:
                raise ValueError(f"reward_fn must return a list of floats, got {values!r:.200}") from error
            if scores.shape != (len(examples),) or not torch.isfinite(scores).all():
                raise ValueError(f"reward_fn must return {len(examples)} finite floats, got {values!r:.200}")
            table = getattr(self.reward_fn, "last_scores", None)  # RewardFunctions: each function's scores
            if table is not None:
                batch["reward_terms"] = dict(zip(self.reward_fn.metric_names, table))
        else:
            with self.autocast():
                scores = self.model.rewards(batch["input_ids"], batch["attention_mask"]).float()
        if self.config.missing_eos_penalty:
            scores = scores - self.config.missing_eos_penalty * (~batch["has_eos"]).float()
        return scores

    def _show_generation_progress(self, done: int, total: int) -> None:
        self.metrics_log.set_activity(f"generating {self._generating} completions: {done}/{total} tokens")

    def logps(self, role: str, batch: dict, *, return_entropy: bool = False):
        with self.autocast():
            return self.model.token_logprobs(role, batch["input_ids"], batch["attention_mask"],
                                             temperature=self.config.temperature, return_entropy=return_entropy)

    def rollout_metrics(self, batch: dict, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        every = self.config.log_completions_steps
        if every and (self.step + 1) % every == 0:
            self.log_samples(batch, scores)
        metrics = {
            "completions/mean_length": batch["response_length"].float().mean(),
            "completions/clipped_ratio": (~batch["has_eos"]).float().mean(),
        }
        for name, column in batch.get("reward_terms", {}).items():
            column = torch.tensor(column, dtype=torch.float32, device=self.device)
            metrics.update(_reward_term_metrics(name, column, self.ctx))
        return metrics

    def log_samples(self, batch: dict, scores: torch.Tensor) -> None:
        """The first num_completions_to_print completions of this iteration, with their prompts and
        rewards, to completions.jsonl and the report_to integrations (TRL's log_completions)."""
        n = min(self.config.num_completions_to_print, len(batch["examples"]))
        texts = self.tokenizer.batch_decode(batch["completion_ids"][:n], skip_special_tokens=True)
        rewards = scores[:n].float().tolist()
        samples = [{"prompt": ex["prompt"] if isinstance(ex.get("prompt"), str) else ex["prompt_text"],
                    "completion": text, "reward": round(reward, 6)}
                   for ex, text, reward in zip(batch["examples"][:n], texts, rewards)]
        self.metrics_log.log_samples(self.step + 1, samples)

    # ------------------------------------------------------------------ experience -> update
    def make_experience(self, prompts: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(experience, metrics). experience: input_ids, attention_mask [B, T]; mask, advantages
        [B, T-1]; optionally old_logps, ref_logps (and values, returns for PPO)."""
        raise NotImplementedError

    def after_update(self, experience: dict, metrics: dict) -> None:
        """Called after the policy update of each iteration (e.g. adaptive KL)."""

    def training_step(self) -> dict[str, torch.Tensor]:
        (prompts,) = self.next_batches(1)
        # eval mode throughout (as TRL): with LoRA dropout on, the update's log-probs would differ
        # from the rollout's even before any step and the PPO ratio would start off 1
        self.model.eval()
        with torch.no_grad():
            experience, metrics = self.make_experience(prompts)
        metrics.update(self.update(experience))
        self.after_update(experience, metrics)
        return metrics

    def update(self, experience: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ppo_epochs x num_minibatches optimizer steps over shuffled rows of the experience."""
        cfg = self.config
        rows = experience["input_ids"].shape[0]
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        self.metrics_log.set_activity(f"updating the policy ({cfg.ppo_epochs * cfg.num_minibatches} optimizer steps)",
                                      force=True)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows)  # global torch RNG: restored exactly on resume
            for minibatch in torch.tensor_split(order, cfg.num_minibatches):
                micro = [select_rows(experience, idx) for idx in torch.tensor_split(minibatch, cfg.grad_accum_steps) if len(idx)]
                if not micro:
                    continue
                step_metrics = self.optimize(micro, loss_fn=self.policy_loss, weight_fn=self.loss_weight)
                for key, value in step_metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        return {key: value / max(steps, 1) for key, value in sums.items()}

    def loss_weight(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight of a micro-batch's metrics in the step's (tokens for token-mean, else rows)."""
        if self.config.loss_agg == "token-mean":
            return micro["mask"].sum().float()
        return torch.tensor(float(micro["mask"].shape[0]), device=self.device)

    step_total_metrics = ("pg_loss", "vf_loss")

    def whole_step_totals(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
        """The aggregation denominators of the optimizer step's whole minibatch (all micro-batches,
        all ranks), as ppo_loss / value_loss take them: total_tokens N (counted tokens),
        total_sequences S (rows with at least one counted token: fully masked rows never count) and
        norm_length L (the minibatch's token width, the longest of its micro-batches' after
        `select_rows` cut each to its own longest row). N and S are divided by the world size
        (gradients are averaged over ranks); each is at least 1 overall, as for one batch."""
        masks = [mb["mask"] for mb in micro_batches]
        counts = torch.stack([sum(m.sum() for m in masks), sum((m.sum(-1) > 0).sum() for m in masks)]).float()
        tokens, sequences = (self.ctx.all_reduce_sum(counts).clamp(min=1) / self.ctx.world_size).unbind()
        width = torch.tensor([max(m.shape[1] for m in masks)], device=self.device)
        width = int(self.ctx.all_reduce_max(width).item())  # select_rows already synced for the widths
        return {"total_tokens": tokens, "total_sequences": sequences, "norm_length": float(max(width, 1))}

    @property
    def loss_kl_coef(self) -> float:
        """Weight of the KL-to-reference term in the policy loss: the current coefficient when the
        KL goes into the loss (GRPO; PPO with kl_in_reward=False), else 0."""
        return self.kl_ctl.value if self.kl_in_loss else 0.0

    def policy_forward(self, micro: dict[str, torch.Tensor]):
        """(logps, entropy [B, T-1], extras) of the policy on a micro-batch; PPO adds the values.
        The path of `fused_head=False`."""
        logps, entropy = self.model.token_logprobs("policy", micro["input_ids"], micro["attention_mask"],
                                                   temperature=self.config.temperature, return_entropy=True)
        return logps, entropy, {}

    def policy_head(self, micro: dict[str, torch.Tensor]):
        """(`RoleModel.head_inputs`, extras) of the policy on a micro-batch, for the fused head; PPO
        adds the values."""
        return self.model.head_inputs(micro["input_ids"], micro["attention_mask"]), {}

    def policy_objective(self, micro: dict[str, torch.Tensor]) -> dict:
        """The keyword arguments `ppo_loss` and `policy_loss_from_hidden` share: the objective and its
        options, the KL and entropy terms, the aggregation with the step's totals."""
        cfg = self.config
        kl_coef = self.loss_kl_coef
        loss_type, ratio_level = TRAINER_LOSS_TYPES[cfg.loss_type]
        return dict(
            loss_type=loss_type, ratio_level=ratio_level, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
            dual_clip=cfg.dual_clip, sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg,
            rollout_logps=micro["rollout_logps"] if cfg.is_correction else None, is_correction=cfg.is_correction,
            is_clip_min=cfg.is_clip_min, is_clip_max=cfg.is_clip_max, top_entropy_quantile=cfg.top_entropy_quantile,
            ref_logps=micro.get("ref_logps") if kl_coef > 0 else None, kl_coef=kl_coef,
            kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, loss_agg=cfg.loss_agg,
            **(self.step_totals or {}),
        )

    def policy_loss(self, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of a micro-batch: the policy term, plus `extra_loss` (PPO: the value loss)."""
        loss, metrics, extras = self.policy_term(micro, self.policy_head, self.policy_forward)
        return self.extra_loss(micro, extras, loss, metrics)

    def policy_term(self, micro: dict[str, torch.Tensor], head_fn, forward_fn):
        """(loss, metrics, extras) of the policy objective, by the fused head on `head_fn(micro)`
        (`policy_head`) or from the log-probs of `forward_fn(micro)` (`policy_forward`)."""
        cfg = self.config
        objective = self.policy_objective(micro)
        if cfg.fused_head:
            # The policy loss is the final node: the LM head's gradients are made in its forward. Without
            # old_logps (GRPO's single on-policy pass) the current log-probs are the constants.
            head, extras = head_fn(micro)
            loss, metrics = fastrlhf.policy_loss_from_hidden(
                head.hidden, head.weight, head.targets, micro.get("old_logps"), micro["advantages"], micro["mask"],
                temperature=cfg.temperature, **head.head_kwargs(), **objective)
            return loss, metrics, extras
        logps, entropy, extras = forward_fn(micro)
        old_logps = micro["old_logps"] if "old_logps" in micro else logps.detach()  # single on-policy pass
        loss, metrics = fastrlhf.ppo_loss(
            logps, old_logps, micro["advantages"], micro["mask"],
            entropy=entropy if cfg.entropy_coef > 0 else entropy.detach(), **objective)
        return loss, metrics, extras

    def extra_loss(self, micro, extras, loss, metrics):
        """Hook to add terms to the policy loss (PPO: the value loss on `extras["values"]`)."""
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Sample one completion per eval prompt: eval/score (mean), eval/kl (mean per-sequence
        sum of logp - ref_logp), eval/mean_length."""
        if not self.eval_examples:
            return {}
        self.model.eval()
        order = self.ctx.shard(range(len(self.eval_examples)))
        size = self.config.eval_batch_size
        sums = {"score": 0.0, "kl": 0.0, "mean_length": 0.0}
        count = 0
        for start in range(0, len(order), size):
            batch = self.rollout([self.eval_examples[i] for i in order[start : start + size]])
            mask = batch["response_mask"]
            kl = ((self.logps("policy", batch) - self.logps("reference", batch)) * mask).sum(-1)
            sums["score"] = sums["score"] + self.score(batch).sum()
            sums["kl"] = sums["kl"] + kl.sum()
            sums["mean_length"] = sums["mean_length"] + batch["response_length"].sum()
            count += mask.shape[0]
        means = {k: torch.as_tensor(v, device=self.device) / max(count, 1) for k, v in sums.items()}
        return self.metrics_log.to_floats(means, prefix="eval/")


def select_rows(experience: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The experience of `rows`, cut to the longest sequence among them (less padding to compute)."""
    device = experience["input_ids"].device
    rows = rows.to(device)
    mask = experience["attention_mask"][rows]
    width = max(int(mask.sum(-1).max().item()), 2)
    out = {}
    full = experience["input_ids"].shape[1]
    for key, value in experience.items():
        value = value[rows]
        if value.dim() == 2:
            value = value[:, :width] if value.shape[1] == full else value[:, : width - 1]
        out[key] = value
    return out


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the per-row masked sum of `x` [B, T-1]."""
    return (x * mask).sum(-1).mean() if x.shape[0] else x.new_zeros(())


def _reward_term_metrics(name: str, values: torch.Tensor, ctx: DistContext | None = None) -> dict[str, torch.Tensor]:
    """TRL's `rewards/<name>/mean` and `rewards/<name>/std` (sample std) of one reward function's
    scores, leaving out the completions it returned None for (NaN); 0 when none is left. Over every
    rank's completions (`global_masked_mean_var`, a collective: every rank calls it)."""
    mean, var = global_masked_mean_var(values, ~torch.isnan(values), ctx)
    return {f"rewards/{name}/mean": mean, f"rewards/{name}/std": var.sqrt()}
