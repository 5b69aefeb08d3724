"""Names and limits that the kernels, the PyTorch twins, the trainers and the CLI must agree on.

Each is defined here once and imported everywhere else, so a new loss type, estimator or metric is
added in one place. Plain Python only: the kernels (`fastrlhf.kernels`) import this module too,
and it must stay importable without torch or triton.
"""
from __future__ import annotations

# Targets equal to this id are ignored: logp 0, entropy 0, no gradient (PyTorch's cross-entropy value).
IGNORE_INDEX = -100

# Log-ratios are clamped to [-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT] before `exp`, so exp stays finite in fp32.
LOG_RATIO_LIMIT = 20.0

# KL estimators (Schulman, "Approximating KL divergence"), keyed by every accepted name: our
# k1 / k2 / k3 (OpenRLHF's and TRL's names) and verl's aliases "kl", "mse", "low_var_kl".
KL_ESTIMATOR_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
KL_ESTIMATORS = ("k1", "k2", "k3")

# How a [B, T] per-token loss becomes a scalar (verl's names; see `fastrlhf.twins.ppo.aggregation_row_scale`).
# Fully masked rows never count as sequences (verl's agg_loss, OpenRLHF's aggregate_loss).
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Policy objectives of `ppo_loss` / `policy_loss_from_hidden`; the kernels select one by its position.
#   ppo    clipped surrogate (Schulman et al. 2017), asymmetric clip, dual clip
#   cispo  clipped importance-sampling weight, stop-gradient, times log pi (MiniMax-M1, 2025)
#   sapo   soft sigmoid gate instead of the clip (Qwen, "Soft Adaptive Policy Optimization", 2025)
POLICY_LOSS_TYPES = ("ppo", "cispo", "sapo")
# Where the importance ratio lives: per token, or one per sequence (GSPO, Zheng et al. 2025).
RATIO_LEVELS = ("token", "sequence")
# Corrections for the rollout engine / trainer mismatch (TRL's vllm_importance_sampling_mode names):
# weight w = pi_old / pi_rollout per token or per sequence (product over its tokens), then
# "truncate" clips w to [is_clip_min, is_clip_max] (TIS), "mask" zeroes it outside (MIS / IcePop).
IS_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# Other libraries' names for the same corrections (OpenRLHF: tis, icepop).
IS_CORRECTION_ALIASES = {**{name: name for name in IS_CORRECTIONS}, "tis": "token_truncate", "icepop": "token_mask"}
# The SFT loss's aggregations of the token NLL (mean over all tokens, or of per-sequence means).
SFT_LOSS_AGGS = ("token-mean", "seq-mean-token-mean")

# How `group_advantages` measures a group's spread: "sample" divides by n - 1 (TRL, verl, OpenRLHF:
# torch.std), "population" by n. A group of one sample has advantage 0 under either.
GROUP_STD_KINDS = ("sample", "population")

# What the trainers' --loss-type selects: (ppo_loss's loss_type, its ratio_level).
TRAINER_LOSS_TYPES = {"ppo": ("ppo", "token"), "gspo": ("ppo", "sequence"), "cispo": ("cispo", "token"),
                      "sapo": ("sapo", "token")}

# Advantage estimators of `fastrlhf.compute_advantages` (verl's names), and other libraries' names
# for the same ones (OpenRLHF: group_norm, reinforce_baseline; the papers' spellings).
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
ADVANTAGE_ESTIMATOR_ALIASES = {
    **{name: name for name in ADVANTAGE_ESTIMATORS},
    "group_norm": "grpo", "dr-grpo": "dr_grpo", "reinforce++": "reinforce_plus_plus",
    "reinforce++-baseline": "reinforce_plus_plus_baseline", "reinforce_baseline": "reinforce_plus_plus_baseline",
}

# DPO-family loss types. The kernel selects one by its position in this tuple.
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "apo_zero")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")
LABEL_SMOOTHING_LOSS_TYPES = ("sigmoid", "robust", "simpo")
# Losses taken on length-normalised (mean per token) sequence log-probs: IPO as in TRL, SimPO and
# ORPO as in their papers. The DPO trainer and `dpo_loss_from_hidden` average for these.
LENGTH_AVERAGED_LOSS_TYPES = ("ipo", "simpo", "orpo")

# KTO losses on unpaired data (Ethayarajh et al. 2024); TRL's KTOConfig.loss_type names. The kernel
# has no branch per type: "apo_zero_unpaired" (D'Oosterlinck et al. 2024, unpaired eq. 7) is the
# KTO loss with the reference point z0 = 0, so it needs no KL rows.
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

# ORPO's odds p / (1 - p) need p < 1: log-probs are clamped to at most this value (TRL clamps
# exp(logp) at 1 - 1e-7 for the same reason); no gradient flows through the clamp above it.
ORPO_MAX_LOGP = -1e-6

# --------------------------------------------------------------------------- fused-kernel statistics
# Each fused loss kernel also reduces its inputs to a vector of statistics, in this order; the
# public functions turn that vector into the metrics dict by name.

# `ppo_loss`: sums over all tokens (the public function divides by the counted tokens).
PPO_STATS = (
    "loss",          # sum w * (pg + kl_coef * kl - entropy_coef * entropy), w = aggregation weight
    "pg_loss",       # sum w * pg
    "clipped",       # sum m * [clipped surrogate > unclipped surrogate]
    "approx_kl",     # sum m * 0.5 * log_ratio^2
    "ratio",         # sum m * ratio
    "kl",            # sum m * kl           (0 without ref_logps)
    "entropy",       # sum m * entropy      (0 without entropy)
    "dual_clipped",  # sum m * [dual clip active]  (0 without dual_clip)
    "is_weight",     # sum m * rollout IS weight   (0 without is_correction)
    "is_clipped",    # sum m * [IS weight truncated or masked]
    "entropy_kept",  # sum m * [token among the top entropy quantile]  (0 without top_entropy_quantile)
)
# `ppo_loss` / `value_loss`: per (row, token chunk) UNWEIGHTED sums, aggregated into the loss and
# divided into the metrics by one finalize kernel (`fastrlhf.kernels.aggregate`). Column 0 is the
# mask sum n; the next columns are the terms each aggregation weighs (policy, KL, entropy / the
# value loss), then the metric numerators. Every sum is over m * (value), m the mask.
PPO_PARTIALS = (
    "n", "pg", "kl", "entropy",        # aggregated: loss = agg(pg) + kl_coef agg_kl(kl) - entropy_coef agg_ent(entropy)
    "clipped", "approx_kl", "ratio", "dual_clipped", "is_weight", "is_clipped", "entropy_kept",
)
VALUE_PARTIALS = ("n", "loss", "clipped", "values")
# `dpo_loss`: means over the batch, published under these names (TRL's).
DPO_STATS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
    "nll_loss", "log_odds_ratio", "log_odds_chosen",  # ORPO only (zero otherwise)
)
ORPO_STATS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")
# `kto_loss`: published under these names (TRL's KTOTrainer). rewards/ and logps/ are means over the
# desirable ("chosen") or undesirable ("rejected") rows only (0 when the batch has none), margins
# the difference of the two means, kl the reference point z0 the loss used, count/ the row counts.
KTO_STATS = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
    "kl", "count/chosen", "count/rejected",
)
# `kto_loss`'s per-block partial sums when B spans several blocks (added up, then divided by a
# single-program finalize): the weighted loss / B, the row counts, and the sums of the metrics.
KTO_PARTIALS = (
    "loss", "count/chosen", "count/rejected", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
)
# `reward_loss`: means over the batch.
REWARD_STATS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")
