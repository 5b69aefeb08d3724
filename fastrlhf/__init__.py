"""fastrlhf: fused Triton kernels and thin trainers for RLHF.

Every loss is a drop-in function with a pure-PyTorch twin in `fastrlhf.twins`::

    from fastrlhf import token_logprobs, ppo_loss, gae, dpo_loss

Names are imported lazily, so `import fastrlhf` stays light.
"""
from fastrlhf._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # log-probabilities
    "token_logprobs": "fastrlhf.losses.logprobs",
    "logprobs_from_logits": "fastrlhf.losses.logprobs",
    # PPO family
    "kl_penalty": "fastrlhf.losses.ppo",
    "ppo_loss": "fastrlhf.losses.ppo",
    "value_loss": "fastrlhf.losses.ppo",
    # advantages
    "gae": "fastrlhf.losses.advantages",
    "whiten": "fastrlhf.losses.advantages",
    "group_advantages": "fastrlhf.losses.advantages",
    "compute_advantages": "fastrlhf.estimators",
    # the fused RL head: hidden states -> (loss, metrics), gradients computed in the forward pass
    "policy_loss_from_hidden": "fastrlhf.losses.fused_head",
    "dpo_loss_from_hidden": "fastrlhf.losses.fused_head",
    "sft_loss_from_hidden": "fastrlhf.losses.fused_head",
    # ... and from logits the model made (GRPO from logits: one read of the logits, the gradient written once)
    "policy_loss_from_logits": "fastrlhf.losses.fused_head",
    # preference losses
    "dpo_loss": "fastrlhf.losses.preference",
    "kto_loss": "fastrlhf.losses.preference",
    "kto_kl": "fastrlhf.losses.preference",
    "reward_loss": "fastrlhf.losses.preference",
    "sequence_logps": "fastrlhf.losses.preference",
    # models and the roles on one base
    "load_causal_lm": "fastrlhf.models",
    "RoleModel": "fastrlhf.roles",
    # backend selection
    "set_default_backend": "fastrlhf._dispatch",
    "use_backend": "fastrlhf._dispatch",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
