"""Thin SFT, reward-model, DPO, KTO, PPO and GRPO trainers on one shared `Trainer` base.

    from fastrlhf.trainers import SFTTrainer, SFTConfig
    summary = SFTTrainer(role_model, tokenizer, SFTConfig(output_dir="out"), records).train()

Names are imported lazily (transformers/peft load only when a trainer is used).
"""
from fastrlhf._lazy import lazy_exports

_EXPORTS = {
    "Trainer": "fastrlhf.trainers.base",
    "TrainerConfig": "fastrlhf.trainers.config",
    "SFTTrainer": "fastrlhf.trainers.sft",
    "SFTConfig": "fastrlhf.trainers.sft",
    "RewardTrainer": "fastrlhf.trainers.rm",
    "RewardConfig": "fastrlhf.trainers.rm",
    "DPOTrainer": "fastrlhf.trainers.dpo",
    "DPOConfig": "fastrlhf.trainers.dpo",
    "KTOTrainer": "fastrlhf.trainers.kto",
    "KTOConfig": "fastrlhf.trainers.kto",
    "PPOTrainer": "fastrlhf.trainers.ppo",
    "PPOConfig": "fastrlhf.trainers.ppo",
    "GRPOTrainer": "fastrlhf.trainers.grpo",
    "GRPOConfig": "fastrlhf.trainers.grpo",
    "RolloutEngine": "fastrlhf.trainers.rollout",
    "HFGenerateEngine": "fastrlhf.trainers.rollout",
    "FixedKLController": "fastrlhf.trainers.kl_control",
    "AdaptiveKLController": "fastrlhf.trainers.kl_control",
}
# trainer name -> (trainer class, config class), for the CLI
TRAINERS = {
    "sft": ("SFTTrainer", "SFTConfig"),
    "rm": ("RewardTrainer", "RewardConfig"),
    "dpo": ("DPOTrainer", "DPOConfig"),
    "kto": ("KTOTrainer", "KTOConfig"),
    "ppo": ("PPOTrainer", "PPOConfig"),
    "grpo": ("GRPOTrainer", "GRPOConfig"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
