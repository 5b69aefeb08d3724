"""Policy, reference, value and reward roles on ONE copy of the base weights.

LoRA mode (default): one peft model holds one adapter per trained role; the base stays frozen.

    policy    = adapter "policy"                  -> lm_head -> logps
    reference = adapters disabled, no grad        -> lm_head -> ref logps
    value     = adapter "value"  + value head     -> V(s_t)          [B, T]
    reward    = adapter "reward" + score head     -> r(x, y) at the last real token   [B]

Full fine-tuning (`use_lora=False`): the policy trains the whole base, the value head sits on the
policy trunk, the reference is a frozen copy (optionally on another device, e.g. "cpu"), and a reward
role next to a policy gets its own copy of the trunk.

`RoleModel` is the role-facing API, the same in both modes; how the trunks are held (adapters or
copies) is `fastrlhf.role_trunks.LoraTrunks` / `FullTrunks`.

Hidden states come from the decoder (after the final norm), never from the CausalLM forward, so the
[B, T, V] logits are never materialised: log-probs go through `fastrlhf.token_logprobs`.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, NamedTuple

import torch
from torch import nn

import fastrlhf
from fastrlhf._checks import check_softcap
from fastrlhf.contracts import IGNORE_INDEX
from fastrlhf.models import base_fingerprint
from fastrlhf.role_trunks import FullTrunks, LoraTrunks, RoleTrunks

ROLES = ("policy", "value", "reward")
REFERENCE = "reference"
HEAD_ROLES = ("value", "reward")  # roles with a scalar head
CONFIG_FILE = "fastrlhf_roles.json"
BASE_FILE = "fastrlhf_base.json"  # the identity of the base the adapters were trained on


class HeadInputs(NamedTuple):
    """What the fused RL head (`fastrlhf.policy_loss_from_hidden`, `dpo_loss_from_hidden`,
    `sft_loss_from_hidden`) takes from a role, in the next-token layout of `token_logprobs`:

    hidden   `[B, T-1, H]` final hidden states of positions 0..T-2 (a view of `[B, T, H]`, no copy),
             on the policy's device, with grad when the role trains
    targets  `[B, T-1]` the next tokens `input_ids[:, 1:]`, -100 where `attention_mask[:, 1:]` is 0
             (and outside `loss_mask[:, 1:]` when one was given)
    weight   `[V, H]` LM-head weight; bias `[V]` or None; softcap the model's final-logit soft-cap or None
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    def head_kwargs(self) -> dict:
        """bias= and softcap= keyword arguments of the fused head functions."""
        return {"bias": self.bias, "softcap": self.softcap}


class RoleModel(nn.Module):
    """Roles on one base model. See the module docstring.

    base_model: a Hugging Face causal LM (e.g. from `load_causal_lm`). In LoRA mode it is wrapped in
        place by peft (its weights are frozen and shared by every role).
    roles: subset of ("policy", "value", "reward"); "reference" is always available.
    trainable_roles: roles whose adapter / head / trunk get gradients (default: all of `roles`), e.g.
        PPO trains ("policy", "value") and keeps a loaded "reward" frozen.
    with_reference: no-LoRA only; False skips the frozen reference copy (e.g. DPO with precomputed
        reference log-probs). Without a policy role there is no copy either (nothing to refer to).
    """

    def __init__(
        self,
        base_model,
        *,
        roles: Iterable[str] = ("policy",),
        use_lora: bool = True,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] | None = None,
        reference_device: torch.device | str | None = None,
        trainable_roles: Iterable[str] | None = None,
        with_reference: bool = True,
    ):
        super().__init__()
        roles = tuple(dict.fromkeys([roles] if isinstance(roles, str) else roles))
        _check_roles("roles", roles)
        if not roles:
            raise ValueError(f"roles must name at least one of {ROLES}")
        trainable = roles if trainable_roles is None else tuple(dict.fromkeys(trainable_roles))
        _check_roles("trainable_roles", trainable, allowed=roles)
        self.roles = roles
        self.trainable_roles = trainable
        self.use_lora = use_lora
        self.lora_settings = {
            "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
            "lora_target_modules": lora_target_modules,
        }

        # Gemma-2-style c * tanh(logits / c): the fused log-probs read lm_head(hidden), so they must
        # apply the model's cap themselves, or every log-prob, KL and loss would be another model's.
        self._logit_softcap = check_softcap(
            getattr(getattr(base_model, "config", None), "final_logit_softcapping", None))
        lm_head = base_model.get_output_embeddings().weight
        hidden_size, device = lm_head.shape[1], lm_head.device
        head_dtype = torch.promote_types(lm_head.dtype, torch.float32)
        std = getattr(base_model.config, "initializer_range", 0.02)
        # Heads are (at least) fp32 whatever the base dtype: one scalar per token is cheap, and bf16
        # rounding of values / rewards would be visible in the losses. The reward head has no bias,
        # like transformers' sequence-classification `score` layers, so the reward model exports as
        # one with the same scores (a Bradley-Terry loss cannot see a constant bias anyway).
        self.heads = nn.ModuleDict(
            {role: _scalar_head(hidden_size, std, device, head_dtype, bias=role != "reward")
             for role in roles if role in HEAD_ROLES}
        )

        # The trunks come after the heads: peft's LoRA init draws from the same RNG as the heads', and
        # the state dict lists the heads first. The strategy object itself is a plain attribute, so
        # only the modules it names are in the tree (never the no-LoRA reference copy it holds).
        if use_lora:
            trunks: RoleTrunks = LoraTrunks(base_model, roles, self.lora_settings, self._refresh_requires_grad)
        else:
            trunks = FullTrunks(base_model, roles, with_reference=with_reference, reference_device=reference_device)
        self._trunks = trunks
        for name, module in trunks.modules.items():
            self.add_module(name, module)
        self._refresh_requires_grad()

    # ------------------------------------------------------------------ plumbing

    @property
    def causal_lm(self):
        """The (LoRA-injected, in LoRA mode) causal LM of the policy."""
        return self._trunks.causal_lm

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H] output projection of the policy (the tied embedding matrix for tied models)."""
        return self.causal_lm.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """[V] output bias or None."""
        return getattr(self.causal_lm.get_output_embeddings(), "bias", None)

    @property
    def logit_softcap(self) -> float | None:
        """The model's final-logit soft-cap c (Gemma 2: logits -> c * tanh(logits / c)) or None. Every
        log-prob and fused loss computed from hidden states must apply it (`softcap=`)."""
        return self._logit_softcap

    @property
    def reference_copy(self) -> nn.Module | None:
        """The frozen full-fine-tuning reference copy, or None (LoRA mode: the reference is the base
        with the adapters off). It is kept outside the module tree: `.to()`, `.parameters()` and
        `state_dict()` of the RoleModel neither move, train nor save it."""
        return self._trunks.reference_lm

    @property
    def value_shares_policy_forward(self) -> bool:
        """Whether one trunk pass serves the policy and the value head (full fine-tuning), or the
        value role runs a pass of its own (LoRA: its own adapter)."""
        return self._trunks.value_shares_policy_forward

    def shard_reference_copy(self, ctx, *, mixed_precision: torch.dtype | None = None) -> bool:
        """Shard the frozen no-LoRA reference copy with FSDP2 over `ctx`'s ranks (the trainers do it
        with --fsdp, after sharding this model): see `FullTrunks.shard_reference`. False when there is
        no copy (LoRA: the reference is the shared base) or it lives on another device type."""
        return self._trunks.shard_reference(ctx, mixed_precision=mixed_precision)

    @property
    def _adapter_params(self) -> dict[str, list[nn.Parameter]]:
        """LoRA mode: {role: its LoRA parameters}."""
        return self._trunks.adapter_params()

    @property
    def _tuner_layers(self) -> list[nn.Module]:
        """LoRA mode: peft's adapter layers."""
        return self._trunks.tuner_layers

    def _trunk(self, role: str):
        """The causal LM whose decoder computes `role`'s hidden states."""
        return self._trunks.reference_trunk() if role == REFERENCE else self._trunks.trunk(role)

    def _low_precision_forward(self):
        """Context for a trained role's forward: autocast over fp32 adapters on a bf16/fp16 base."""
        return self._trunks.low_precision_forward()

    def _refresh_requires_grad(self) -> None:
        owned = self._trunks.owned_params()
        for role in self.roles:
            trainable = role in self.trainable_roles
            for p in self._role_params(role, owned):
                p.requires_grad_(trainable)

    def _role_params(self, role: str, owned: dict | None = None) -> list[nn.Parameter]:
        """Parameters that belong to `role` alone (adapter / trunk and head), trainable or not."""
        params = list(self.heads[role].parameters()) if role in self.heads else []
        return params + (owned if owned is not None else self._trunks.owned_params())[role]

    def _decoder_hidden(self, role: str, input_ids, attention_mask, then=None) -> torch.Tensor:
        """[B, T, H] hidden states of `role`, on the device of its trunk; or `then(hidden)` (e.g. the
        log-probs), computed in the same reference pass (a sharded reference copy gathers its LM
        head for that pass only: `RoleTrunks.run_reference`)."""
        _check_role(role)
        then = then or (lambda hidden: hidden)
        trunk = self._trunk(role)
        device = trunk.get_output_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        decoder = decoder_of(trunk)
        if role == REFERENCE:
            return self._trunks.run_reference(lambda: then(decoder(**kwargs).last_hidden_state))
        self._trunks.activate(role)
        with self._low_precision_forward():
            hidden = decoder(**kwargs).last_hidden_state
        return then(hidden)

    # ------------------------------------------------------------------ public API

    def forward(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(role, input_ids, attention_mask)

    def hidden_states(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H] final hidden states (after the final norm) of `role`.

        input_ids, attention_mask: [B, T], attention_mask 1 = real token; left or right padding.
        The reference runs without grad; its result is moved to the policy's device.
        """
        return self._decoder_hidden(role, input_ids, attention_mask).to(self.device)

    def token_logprobs(
        self,
        role: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        """logps [B, T-1] of targets input_ids[:, 1:] under `role` (policy or reference)
        (, entropy [B, T-1]). Positions where attention_mask[:, 1:] == 0 give 0.

        Computed by `fastrlhf.token_logprobs` from the hidden states: no [B, T, V] logits.
        """
        if role not in ("policy", REFERENCE):
            raise ValueError(f"role must be 'policy' or 'reference' for token_logprobs, got {role!r}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and role != REFERENCE):
            return self._decoder_hidden(role, input_ids, attention_mask, then=lambda hidden: self._logprobs_from_hidden(
                role, hidden, input_ids, attention_mask, temperature, return_entropy))

    def _logprobs_from_hidden(self, role, hidden, input_ids, attention_mask, temperature, return_entropy):
        """Fused lm_head + log-softmax + gather on the trunk's device; results on the policy device."""
        mask = attention_mask.to(hidden.device)
        targets = input_ids.to(hidden.device)[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        head = self._trunk(role).get_output_embeddings()
        out = fastrlhf.token_logprobs(
            hidden[:, :-1], head.weight, targets, bias=getattr(head, "bias", None),
            temperature=temperature, return_entropy=return_entropy, softcap=self._logit_softcap,
        )
        device = self.device
        return tuple(t.to(device) for t in out) if return_entropy else out.to(device)

    def head_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        loss_mask: torch.Tensor | None = None,
    ) -> HeadInputs:
        """The policy's final hidden states and LM head for a fused loss (`HeadInputs`), e.g.

            h = roles.head_inputs(input_ids, attention_mask, loss_mask=loss_mask)
            loss, metrics = fastrlhf.sft_loss_from_hidden(h.hidden, h.weight, h.targets, **h.head_kwargs())

        The loss is then the final node and computes the head's gradients in its forward (6·N·V·H
        FLOPs instead of the 8·N·V·H of `token_logprobs` + a loss). input_ids, attention_mask,
        loss_mask: `[B, T]`; loss_mask (optional) 1 where a token's log-prob counts: targets are -100
        outside it, so the head reads no logits there. Under FSDP2 (a registered forward method) the
        LM head stays gathered after the call, until the backward: the root is not resharded after
        its forward.
        """
        self._require("policy")
        hidden = self._decoder_hidden("policy", input_ids, attention_mask)
        return self._head_inputs(hidden, input_ids, attention_mask, loss_mask)

    def head_inputs_and_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[HeadInputs, torch.Tensor]:
        """(`head_inputs(...)`, values [B, T]): the policy's fused-head inputs and the value role's
        values, like `token_logprobs_and_values`. Without LoRA one trunk forward serves both (the
        value head sits on the policy trunk); with LoRA it is one forward per adapter."""
        self._require("policy")
        self._require("value")
        hidden = self._decoder_hidden("policy", input_ids, attention_mask)
        head = self._head_inputs(hidden, input_ids, attention_mask, None)
        if not self._trunks.value_shares_policy_forward:
            hidden = self._decoder_hidden("value", input_ids, attention_mask).to(self.device)
        # Private helpers only, no nested public forward method: under FSDP2 a nested one's end marks
        # the root idle, and the outer one's end would then reshard the LM head the loss still reads.
        return head, self._values_from_hidden(hidden, attention_mask)

    def _head_inputs(self, hidden, input_ids, attention_mask, loss_mask) -> HeadInputs:
        """`HeadInputs` of the policy from its `[B, T, H]` hidden states (on the policy trunk's device)."""
        device = hidden.device
        keep = attention_mask.to(device)[:, 1:] != 0
        if loss_mask is not None:
            keep = keep & (loss_mask.to(device)[:, 1:] != 0)
        targets = input_ids.to(device)[:, 1:].masked_fill(~keep, IGNORE_INDEX)
        head = self._trunk("policy").get_output_embeddings()
        return HeadInputs(hidden[:, :-1], targets, head.weight, getattr(head, "bias", None), self._logit_softcap)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 (float64 for a float64 base) value estimates V(s_t) (value role + value head); 0 on padding."""
        self._require("value")
        return self._values_from_hidden(self.hidden_states("value", input_ids, attention_mask), attention_mask)

    def _values_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        head = self.heads["value"]
        values = head(hidden.to(head.weight.dtype)).squeeze(-1)
        return values * attention_mask.to(values.device, values.dtype)

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] float32 (float64 for a float64 base) scores r(x, y) of the reward role's score head at each row's last real token."""
        self._require("reward")
        hidden = self.hidden_states("reward", input_ids, attention_mask)
        last = last_token_index(attention_mask.to(hidden.device))
        last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        head = self.heads["reward"]
        return head(last_hidden.to(head.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """[B, T + new] sequences sampled from the policy (HF generate, no grad). Left-pad the prompts."""
        self._require("policy")
        self._trunks.activate("policy")
        generate_kwargs.setdefault("pad_token_id", self.causal_lm.generation_config.pad_token_id)
        with self._low_precision_forward():
            return self.causal_lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def trainable_parameters(self, role: str | None = None) -> list[nn.Parameter]:
        """Parameters the optimizer should update: of `role`, or of every trainable role (None)."""
        roles = self.trainable_roles if role is None else (role,)
        if role is not None:
            self._require(role)
        seen, params = set(), []
        for r in roles:
            if r not in self.trainable_roles:
                continue
            for p in self._role_params(r):
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def gradient_checkpointing_enable(self) -> None:
        """Recompute decoder activations during backward instead of storing them, in training AND
        in eval mode.

        Non-reentrant checkpointing (works with a frozen embedding). In LoRA mode the recomputation
        re-activates the adapter that was active in the forward (`LoraTrunks.checkpoint_kwargs`).
        transformers checkpoints a layer only while `layer.training` is True, and PPO/GRPO run their
        whole iteration in eval mode (no dropout, so the update's log-probs equal the rollout's):
        there checkpointing would be silently off (Qwen2.5-7B PPO, B=8, T=2048: 211 GiB instead of
        28 GiB predicted). So while checkpointing is on, `eval()` keeps the decoder layers themselves
        flagged as training and every other module (dropout, attention, LoRA layers) in eval mode:
        the outputs are eval mode's, and layers are checkpointed whenever gradients are recorded
        (under no_grad nothing is checkpointed or stored either way). See `_checkpointed_layers`.
        """
        kwargs = {"use_reentrant": False, **self._trunks.checkpoint_kwargs()}
        for trunk in self._trained_trunks():
            if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5
                trunk.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._checkpointing = True
        if not self.training:
            self._flag_checkpointed_layers()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return getattr(self, "_checkpointing", False)

    def train(self, mode: bool = True):
        """`nn.Module.train`; in eval mode (`mode=False`) with checkpointing on, the decoder layers stay
        flagged as training so that they are still checkpointed (`gradient_checkpointing_enable`)."""
        super().train(mode)
        if not mode and self.is_gradient_checkpointing:
            self._flag_checkpointed_layers()
        return self

    def _trained_trunks(self) -> list[nn.Module]:
        """The distinct causal LMs the roles run on (the reference copy is never trained)."""
        return list({id(self._trunk(r)): self._trunk(r) for r in self.roles}.values())

    def _flag_checkpointed_layers(self) -> None:
        for layer in self._checkpointed_layers():
            layer.training = True  # the layer object only: its children keep eval mode

    def _checkpointed_layers(self) -> list[nn.Module]:
        """The decoder layers that transformers checkpoints (`GradientCheckpointingLayer` with
        checkpointing on) and whose own forward does not read `self.training` (flagging one that does,
        e.g. a layer calling functional dropout with training=self.training, would switch its dropout
        on). Layers that read it, or transformers without `GradientCheckpointingLayer` (< 4.52, which
        checked `model.training` in the model's loop), stay unflagged: checkpointing is then off in
        eval mode, with a warning."""
        cached = getattr(self, "_checkpointed_layers_cache", None)
        if cached is not None:
            return cached
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:
            GradientCheckpointingLayer = None
        layers, refused = [], set()
        for trunk in self._trained_trunks():
            for module in trunk.modules():
                if GradientCheckpointingLayer is None or not isinstance(module, GradientCheckpointingLayer):
                    continue
                if not getattr(module, "gradient_checkpointing", False):
                    continue
                if _forward_reads_training(type(module)):
                    refused.add(type(module).__name__)
                else:
                    layers.append(module)
        if GradientCheckpointingLayer is None or refused:
            import warnings

            warnings.warn("activation checkpointing stays off in eval mode (PPO/GRPO updates) for "
                          + (", ".join(sorted(refused)) + " (its forward reads self.training)" if refused
                             else "this transformers version (no GradientCheckpointingLayer; needs >= 4.52)"),
                          stacklevel=3)
        self._checkpointed_layers_cache = layers
        return layers

    def token_logprobs_and_values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        """(logps [B, T-1], values [B, T]) or (logps, entropy, values): the policy and value roles
        together. Without LoRA the value head sits on the policy trunk, so ONE trunk forward serves
        both; with LoRA it is one forward per adapter."""
        self._require("policy")
        self._require("value")
        if self._trunks.value_shares_policy_forward:
            hidden = self._decoder_hidden("policy", input_ids, attention_mask)
            out = self._logprobs_from_hidden("policy", hidden, input_ids, attention_mask, temperature, return_entropy)
            values = self._values_from_hidden(hidden, attention_mask)
        else:
            out = self.token_logprobs("policy", input_ids, attention_mask,
                                      temperature=temperature, return_entropy=return_entropy)
            values = self.values(input_ids, attention_mask)
        return (*out, values) if return_entropy else (out, values)

    # ------------------------------------------------------------------ memory

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Bytes per role; the shared base is counted once.

        {"base": {"params_bytes"}, <role>: {"params_bytes", "trainable_bytes", "optimizer_bytes"},
         "reference": {"params_bytes", "device"}, "total_bytes"}
        params_bytes of a role = what it adds on top of the base (LoRA: adapter + head; no-LoRA policy:
        0, since it trains the base itself). optimizer_bytes = the optimizer's state tensors actually
        allocated for the role's parameters, or 2 x fp32 per trainable parameter (AdamW) when no
        optimizer (or no step yet). total = base + sum of params + optimizer bytes; storage shared by
        several parameters (tied embeddings) is counted once.
        """
        base = self._base_params()
        report: dict = {"base": {"params_bytes": _unique_bytes(base)}}
        counted = {p.data_ptr() for p in base}
        total = report["base"]["params_bytes"]
        for role in self.roles:
            own = [p for p in self._role_params(role) if p.data_ptr() not in counted]
            trainable = self.trainable_parameters(role) if role in self.trainable_roles else []
            entry = {
                "params_bytes": _unique_bytes(own),
                "trainable_bytes": _unique_bytes(trainable),
                "optimizer_bytes": _optimizer_bytes(trainable, optimizer),
            }
            counted |= {p.data_ptr() for p in own}
            report[role] = entry
            total += entry["params_bytes"] + entry["optimizer_bytes"]
        reference_copy = self._trunks.reference_lm
        reference = {
            "params_bytes": _unique_bytes(list(reference_copy.parameters())) if reference_copy is not None else 0,
            "device": str(self._trunks.reference_device),
            "shared_with_base": self._trunks.reference_shares_base,
            "sharded": getattr(self._trunks, "reference_sharded", False),
        }
        report[REFERENCE] = reference
        report["total_bytes"] = total + reference["params_bytes"]
        return report

    def _base_params(self) -> list[nn.Parameter]:
        return self._trunks.base_params()

    # ------------------------------------------------------------------ state

    def role_state_dict(self, role: str) -> dict[str, torch.Tensor]:
        """Adapter (or, without LoRA, trunk) + head weights of one role; detached, not copied.

        Adapter keys are role-neutral (peft's format), so a state dict loads into any role, e.g. a
        trained "reward" adapter into the reward role of the PPO model.
        """
        self._require(role)
        group = self._trunks.state_group
        state = {f"{group}.{k}": v for k, v in self._trunks.role_state(role).items()}
        if role in self.heads:
            state.update({f"head.{k}": v.detach() for k, v in self.heads[role].state_dict().items()})
        return state

    def load_role_state_dict(self, role: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Load what `role_state_dict` returned (from this or another RoleModel) into `role`."""
        self._require(role)
        groups: dict[str, dict] = {"adapter": {}, "trunk": {}, "head": {}}
        for key, value in state_dict.items():
            group, _, name = key.partition(".")
            if group not in groups:
                raise ValueError(f"unexpected key {key!r} in the state dict of role {role!r}")
            groups[group][name] = value
        self._trunks.load_role_state(role, groups[self._trunks.state_group])
        if role in self.heads:
            head = dict(groups["head"])
            if self.heads[role].bias is not None and "bias" not in head:  # a bias-free reward head into the value head
                head["bias"] = torch.zeros_like(self.heads[role].bias)
            legacy_bias = head.pop("bias", None) if self.heads[role].bias is None else None
            if legacy_bias is not None and legacy_bias.abs().max() > 0:
                import warnings

                warnings.warn(f"the {role} head was saved with a bias ({float(legacy_bias.reshape(-1)[0]):.4g}), "
                              "which reward heads no longer have: every score shifts by that constant "
                              "(preferences and group-normalised advantages are unchanged)", stacklevel=2)
            self.heads[role].load_state_dict(head)
        self._refresh_requires_grad()

    def save(self, output_dir: str) -> str:
        """Write each role's state (role-<name>.safetensors) and the settings (fastrlhf_roles.json)."""
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        for role in self.roles:
            state = {k: v.contiguous() for k, v in self.role_state_dict(role).items()}
            save_file(state, os.path.join(output_dir, f"role-{role}.safetensors"))
        settings = {
            "roles": list(self.roles),
            "trainable_roles": list(self.trainable_roles),
            "use_lora": self.use_lora,
            **self.lora_settings,
        }
        with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
            json.dump(settings, f, indent=2)
        with open(os.path.join(output_dir, BASE_FILE), "w") as f:
            json.dump(self.base_identity(), f, indent=2)
        return output_dir

    def base_identity(self) -> dict:
        """What the adapters were trained on: {"name_or_path", "architecture", "fingerprint"}
        (`fastrlhf.models.base_fingerprint` of the frozen base; None without LoRA, where no frozen
        base is left to compare). A LoRA adapter scores correctly only on this base."""
        config = self.causal_lm.config
        return {
            "name_or_path": getattr(config, "_name_or_path", ""),
            "architecture": (getattr(config, "architectures", None) or [type(self.causal_lm).__name__])[0],
            "fingerprint": base_fingerprint(self.causal_lm.named_parameters()) if self.use_lora else None,
        }

    @classmethod
    def load(cls, base_model, output_dir: str, **overrides) -> "RoleModel":
        """Rebuild a RoleModel saved with `.save(output_dir)` on `base_model` (the same base it was
        trained on). `overrides` replace saved settings, e.g. trainable_roles=() or reference_device."""
        from safetensors.torch import load_file

        path = os.path.join(output_dir, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a directory written by RoleModel.save")
        with open(path) as f:
            settings = {**json.load(f), **overrides}
        model = cls(base_model, **settings)
        for role in model.roles:
            file = os.path.join(output_dir, f"role-{role}.safetensors")
            model.load_role_state_dict(role, load_file(file, device=str(model.device)))
        return model

    def merged_policy(self):
        """A plain PreTrainedModel (a copy) with the policy adapter merged into the base weights.

        After SFT this becomes the base, and so the reference, of the RM / DPO / PPO / GRPO stages.
        """
        self._require("policy")
        return self._trunks.merged_policy().requires_grad_(True)

    def merged_trunk(self, role: str):
        """A plain causal LM (a copy) whose decoder computes `role`'s hidden states: its adapter
        merged into the base (LoRA), or its own trunk (full fine-tuning). The reward model's export."""
        self._require(role)
        return self._trunks.merged_trunk(role)

    # ------------------------------------------------------------------ checks

    def _require(self, role: str) -> None:
        if role not in self.roles:
            raise ValueError(f"role {role!r} is not in this RoleModel (roles={self.roles})")

    def extra_repr(self) -> str:
        return f"roles={self.roles}, trainable_roles={self.trainable_roles}, use_lora={self.use_lora}"


def _check_role(role: str) -> None:
    if role not in ROLES + (REFERENCE,):
        raise ValueError(f"role must be one of {ROLES + (REFERENCE,)}, got {role!r}")


def _check_roles(name: str, roles: tuple, allowed: tuple = ROLES) -> None:
    bad = [r for r in roles if r not in allowed]
    if bad:
        raise ValueError(f"{name} must be a subset of {allowed}, got {bad}")


def _scalar_head(hidden_size: int, std: float, device, dtype: torch.dtype, *, bias: bool = True) -> nn.Linear:
    head = nn.Linear(hidden_size, 1, device=device, dtype=dtype, bias=bias)
    nn.init.normal_(head.weight, std=std)
    if bias:
        nn.init.zeros_(head.bias)
    return head


def _unique_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct parameters held by this process. Identity, not data_ptr(): an FSDP2 DTensor
    reports data_ptr() 0 (every parameter looked like one), and a tied weight is one object. A
    DTensor counts its local shard: the report is per rank."""
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total


def _optimizer_bytes(params: list[nn.Parameter], optimizer) -> int:
    state = getattr(optimizer, "state", {}) if optimizer is not None else {}
    allocated = sum(
        t.numel() * t.element_size()
        for p in params
        for t in state.get(p, {}).values()
        if torch.is_tensor(t)
    )
    if allocated:
        return allocated
    return sum(2 * 4 * p.numel() for p in params)  # AdamW: exp_avg + exp_avg_sq in fp32


def _forward_reads_training(cls: type) -> bool:
    """Whether `cls.forward` itself (under transformers' checkpointing wrapper) reads `.training`."""
    forward = cls.forward
    while hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
    code = getattr(forward, "__code__", None)
    return code is None or "training" in code.co_names


def decoder_of(causal_lm) -> torch.nn.Module:
    """The decoder inside a causal LM (e.g. `LlamaForCausalLM.model`): returns hidden states after the
    final norm without computing the [B, T, V] logits."""
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if decoder is None or decoder is causal_lm:
        decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None)
    if decoder is None or decoder is causal_lm:
        raise ValueError(f"Cannot find the decoder inside {type(causal_lm).__name__}")
    return decoder


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids that count only real tokens, so a left-padded row gets the same positions
    (hence the same outputs) as the unpadded sequence. Padding positions get clamped values."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last real token of each row, for left or right padding."""
    t = attention_mask.shape[-1]
    return t - 1 - attention_mask.long().flip(-1).argmax(-1)


# ---------------------------------------------------------------------------- saved reward roles


def is_fastrlhf_reward_dir(path) -> bool:
    path = str(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, "role-reward.safetensors"))


def reward_dir_fits_base(path: str, base) -> tuple[bool, str]:
    """(True, "") when the LoRA reward adapter in `path` was trained on `base` (same fingerprint),
    else (False, the reason). Directories written before fingerprints were recorded are trusted."""
    file = os.path.join(path, BASE_FILE)
    if not os.path.isfile(file):
        return True, ""
    with open(file) as f:
        saved = json.load(f)
    if saved.get("fingerprint") is None:
        return False, "it holds a fully fine-tuned reward trunk (--no-lora), not an adapter for this base"
    here = base_fingerprint(base.named_parameters())
    if saved["fingerprint"] == here:
        return True, ""
    name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    return False, (f"its reward adapter was trained on another base model ({saved.get('name_or_path') or 'unnamed'}, "
                   f"fingerprint {saved['fingerprint']}) than this one ({name}, fingerprint {here}); a LoRA adapter "
                   "only scores correctly on the weights it was trained on. Train the reward model on this model, "
                   "or use its sequence-classifier export (written by fastrlhf >= this version) as a separate model")


def load_reward_role(role_model, path: str) -> None:
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "role-reward.safetensors"), device=str(role_model.device))
    role_model.load_role_state_dict("reward", state)
