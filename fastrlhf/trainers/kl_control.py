"""KL coefficient controllers for PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2).

    ctl = AdaptiveKLController(init_kl_coef=0.05, target=6.0, horizon=10000)
    ... rewards = scores - ctl.value * kl ...
    ctl.update(current_kl=mean_sequence_kl, n_steps=global_batch_size)

The adaptive rule moves beta towards the value that keeps the per-sequence KL near `target`:
    e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
Both controllers expose `state_dict()` / `load_state_dict()` so a resumed run continues with the
same coefficient.
"""
from __future__ import annotations

from fastrlhf._checks import check_non_negative, check_positive

# Ziegler et al. clip the proportional error to +-0.2 so one noisy batch cannot swing beta far.
PROPORTIONAL_ERROR_CLIP = 0.2


class FixedKLController:
    """A constant KL coefficient (`update` does nothing)."""

    def __init__(self, kl_coef: float) -> None:
        check_non_negative("kl_coef", kl_coef)
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same API as adaptive
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """beta adapted so the mean per-sequence KL to the reference tracks `target` (nats).

    horizon: number of samples over which a persistent error changes beta by about e^0.2.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        check_positive("kl_target", target)
        check_positive("kl_horizon", horizon)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -PROPORTIONAL_ERROR_CLIP), PROPORTIONAL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(kl_coef: float, *, adaptive: bool, target: float, horizon: float) -> FixedKLController:
    """The controller a config asks for: adaptive (target/horizon) or fixed."""
    if adaptive:
        return AdaptiveKLController(kl_coef, target, horizon)
    return FixedKLController(kl_coef)
