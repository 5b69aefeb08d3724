"""Reference log-probs computed once before training and saved with the checkpoints (DPO, KTO).

A trainer whose reference log-prob is a property of each example (not of the step) can compute it
once: with `precompute_ref_logps`, and always without LoRA when the model keeps no reference copy
(then the untrained policy IS the reference, so this must run before the first step). The values
live in the examples (`reference_keys`), are collated into the batches by the trainer, and go into
every checkpoint so that a resumed run does not need the reference any more.
"""
from __future__ import annotations

import torch


class PrecomputedReference:
    """Mixin for a `Trainer`. The subclass sets `reference_keys` (example keys, the first one marks
    examples already done), `reference_state_key` (its entry in the checkpoint's trainer state) and
    implements `precompute` (whether to) and `reference_values(batch, role)`."""

    reference_keys: tuple[str, ...] = ()
    reference_state_key: str = ""

    @property
    def precompute(self) -> bool:
        raise NotImplementedError

    def reference_values(self, batch, role: str) -> list[list[float | None]]:
        """Per example of the collated `batch`, its value of each of `reference_keys` under `role`
        (None: not used, the key is left out)."""
        raise NotImplementedError

    def before_train(self) -> None:
        if not self.precompute:
            return
        for examples in (self.train_examples, self.eval_examples or []):
            if examples and self.reference_keys[0] not in examples[0]:
                self._precompute(examples)

    @torch.no_grad()
    def _precompute(self, examples: list[dict]) -> None:
        role = "reference"
        if not getattr(self.model, "use_lora", True) and getattr(self.model, "reference_copy", None) is None:
            if self.step > 0:
                raise RuntimeError(f"{type(self).__name__}: the model has no reference copy and the policy has "
                                   "already been trained, so reference log-probs cannot be computed any more")
            role = "policy"
        self.model.eval()
        size = self.config.eval_batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            with self.autocast():
                values = self.reference_values(self.collate(chunk), role)
            for example, row in zip(chunk, values):
                _store(example, self.reference_keys, row)
        self.model.train()

    def extra_state(self) -> dict:
        if not self.precompute or self.reference_keys[0] not in self.train_examples[0]:
            return {}
        return {self.reference_state_key: [[e.get(k) for k in self.reference_keys] for e in self.train_examples]}

    def load_extra_state(self, state: dict) -> None:
        saved = state.get(self.reference_state_key)
        if saved is not None and len(saved) == len(self.train_examples):
            for example, row in zip(self.train_examples, saved):
                _store(example, self.reference_keys, row)


def _store(example: dict, keys: tuple[str, ...], values) -> None:
    for key, value in zip(keys, values):
        if value is not None:
            example[key] = value
