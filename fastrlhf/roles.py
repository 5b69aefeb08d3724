"""Policy, reference, value and reward roles on ONE copy of the base weights.

LoRA mode (default): one peft model holds one adapter per trained role; the base stays frozen.

    policy    = adapter "policy"                  -> lm_head -> logps
    reference = adapters disabled, no grad        -> lm_head -> ref logps
    value     = adapter "value"  + value head     -> V(s_t)          [B, T]
    reward    = adapter "reward" + score head     -> r(x, y) at the last real token   [B]

Full fine-tuning (`use_lora=False`): the policy trains the whole base, the value head sits on the
policy trunk, the reference is a frozen copy (optionally on another device, e.g. "cpu"), and a reward
role next to a policy gets its own copy of the trunk.

Hidden states come from the decoder (after the final norm), never from the CausalLM forward, so the
[B, T, V] logits are never materialised: log-probs go through `fastrlhf.token_logprobs`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Iterable

import torch
from torch import nn

import fastrlhf
from fastrlhf._mixed_precision import find_tuner_layers, low_precision_lora
from fastrlhf.reference.logprobs import check_softcap

ROLES = ("policy", "value", "reward")
REFERENCE = "reference"
HEAD_ROLES = ("value", "reward")  # roles with a scalar head
CONFIG_FILE = "fastrlhf_roles.json"
IGNORE_INDEX = -100


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
        # rounding of values / rewards would be visible in the losses.
        self.heads = nn.ModuleDict(
            {role: _scalar_head(hidden_size, std, device, head_dtype) for role in roles if role in HEAD_ROLES}
        )

        # The frozen no-LoRA reference is kept out of the module tree (plain __dict__ entry): .to(),
        # .parameters() and state_dict() of the RoleModel must not move, train or save it.
        self.__dict__["_reference_lm"] = None
        self._reference_device = torch.device(reference_device) if reference_device is not None else device
        if use_lora:
            self._init_lora(base_model)
        else:
            self._init_full(base_model, with_reference)
        self._refresh_requires_grad()

    # ------------------------------------------------------------------ construction

    def _init_lora(self, base_model) -> None:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = self.lora_settings["lora_target_modules"]
        head_name = next(n for n, m in base_model.named_modules() if m is base_model.get_output_embeddings())
        if isinstance(targets, (list, tuple)) and any(head_name == t or head_name.endswith("." + t) for t in targets):
            # checked before peft wraps the base in place
            raise ValueError("lora_target_modules must not include the lm_head (it is shared by all roles)")
        config = LoraConfig(
            r=self.lora_settings["lora_r"],
            lora_alpha=self.lora_settings["lora_alpha"],
            lora_dropout=self.lora_settings["lora_dropout"],
            # "all-linear" = every linear layer of the decoder, never lm_head: the lm_head weight is
            # used directly by the fused log-prob kernel and must stay the shared base weight.
            target_modules=self.lora_settings["lora_target_modules"] or "all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.peft_model = get_peft_model(base_model, config, adapter_name=self.roles[0])
        for role in self.roles[1:]:
            self.peft_model.add_adapter(role, config)
        if isinstance(self.causal_lm.get_output_embeddings(), BaseTunerLayer):
            raise ValueError("lora_target_modules must not include the lm_head (it is shared by all roles)")
        self._active_adapter = None
        self._activate(self.roles[0])
        # Plain list (not submodules) of peft's adapter layers, for `_low_precision_forward`.
        self.__dict__["_tuner_layers"] = find_tuner_layers(self.peft_model)

    def _low_precision_forward(self):
        """fp32 adapters over a bf16/fp16 base: autocast without peft's fp32 activation copies
        (see fastrlhf._mixed_precision); a no-op otherwise."""
        return low_precision_lora(self.lm_head_weight, self.__dict__.get("_tuner_layers", []))

    def _init_full(self, base_model, with_reference: bool) -> None:
        base_model.requires_grad_(False)
        self.policy_lm = base_model  # the trunk of the policy (and value head), or of the reward alone
        if "reward" in self.roles and "policy" in self.roles:
            self.reward_lm = copy.deepcopy(base_model)
        if with_reference and "policy" in self.roles:
            self.__dict__["_reference_lm"] = copy.deepcopy(base_model).to(self._reference_device).eval()

    # ------------------------------------------------------------------ plumbing

    @property
    def causal_lm(self):
        """The (LoRA-injected, in LoRA mode) causal LM of the policy."""
        return self.peft_model.base_model.model if self.use_lora else self.policy_lm

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

    def _trunk(self, role: str):
        """The causal LM whose decoder computes `role`'s hidden states."""
        if role == REFERENCE:
            if self.use_lora:
                return self.causal_lm
            if self._reference_lm is None:
                raise ValueError(
                    "this full fine-tuning RoleModel has no reference copy (with_reference=False, or no policy role)"
                )
            return self._reference_lm
        if not self.use_lora and role == "reward" and "policy" in self.roles:
            return self.reward_lm
        return self.causal_lm

    def _role_owns_trunk(self, role: str) -> bool:
        """No-LoRA: whether `role` trains a trunk (value rides on the policy's)."""
        return not self.use_lora and role in ("policy", "reward")

    def _activate(self, role: str) -> None:
        """Make `role`'s adapter the active one (LoRA mode).

        peft's set_adapter also sets requires_grad=True on the active adapter and False on all others.
        PPO backpropagates through the policy AND the value adapters in one step, and autograd drops
        the gradient of a leaf whose requires_grad is False at backward time, so the trainable flags
        are restored right after every switch. Switching does not touch a graph already recorded: each
        forward saved the tensors of the adapter that was active then.
        """
        if self._active_adapter != role:
            self.peft_model.set_adapter(role)
            self._active_adapter = role
            self._refresh_requires_grad()

    def _refresh_requires_grad(self) -> None:
        adapters = self._adapter_params if self.use_lora else None
        for role in self.roles:
            trainable = role in self.trainable_roles
            for p in self._role_params(role, adapters):
                p.requires_grad_(trainable)

    @property
    def _adapter_params(self) -> dict[str, list[nn.Parameter]]:
        """{role: its LoRA parameters}. Looked up by name on every call, never cached: FSDP2 and
        other wrappers replace Parameter objects, and a cached list would then miss the gradients."""
        params: dict[str, list[nn.Parameter]] = {role: [] for role in self.roles}
        for name, p in self.peft_model.named_parameters():
            parts = name.split(".")  # ...q_proj.lora_A.<role>.weight / ...lora_embedding_A.<role>
            at = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
            if at is not None and at + 1 < len(parts) and parts[at + 1] in params:
                params[parts[at + 1]].append(p)
        return params

    def _role_params(self, role: str, adapters: dict | None = None) -> list[nn.Parameter]:
        """Parameters that belong to `role` alone (adapter / trunk and head), trainable or not."""
        params = list(self.heads[role].parameters()) if role in self.heads else []
        if self.use_lora:
            params += (adapters or self._adapter_params)[role]
        elif self._role_owns_trunk(role):
            params += list(self._trunk(role).parameters())
        return params

    def _decoder_hidden(self, role: str, input_ids, attention_mask) -> torch.Tensor:
        """[B, T, H] hidden states of `role`, on the device of its trunk."""
        _check_role(role)
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
        if role == REFERENCE and self.use_lora:
            try:
                with torch.no_grad(), self.peft_model.disable_adapter():
                    return decoder(**kwargs).last_hidden_state
            finally:
                self._refresh_requires_grad()  # disable_adapter() flips requires_grad too
        if self.use_lora:
            self._activate(role)
        if role == REFERENCE:
            with torch.no_grad():
                return decoder(**kwargs).last_hidden_state
        with self._low_precision_forward():
            return decoder(**kwargs).last_hidden_state

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
            hidden = self._decoder_hidden(role, input_ids, attention_mask)
            return self._logprobs_from_hidden(role, hidden, input_ids, attention_mask, temperature, return_entropy)

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
        if self.use_lora:
            self._activate("policy")
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
        """Recompute decoder activations during backward instead of storing them.

        Non-reentrant checkpointing (works with a frozen embedding). In LoRA mode the recomputation
        re-activates the adapter that was active in the forward: PPO switches from the policy to the
        value adapter between forward and backward, and a plain recompute would silently use the
        wrong adapter.
        """
        kwargs = {"use_reentrant": False}
        if self.use_lora:
            kwargs["context_fn"] = self._checkpoint_contexts
        trunks = {id(self._trunk(r)): self._trunk(r) for r in self.roles}.values()
        for trunk in trunks:
            if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5
                trunk.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _checkpoint_contexts(self):
        """torch.utils.checkpoint context_fn: (forward context, recompute context)."""
        return contextlib.nullcontext(), self._adapter_during(self._active_adapter)

    @contextlib.contextmanager
    def _adapter_during(self, role: str):
        previous = self._active_adapter
        self._activate(role)
        try:
            yield
        finally:
            self._activate(previous)

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
        if self.use_lora:
            out = self.token_logprobs("policy", input_ids, attention_mask,
                                      temperature=temperature, return_entropy=return_entropy)
            values = self.values(input_ids, attention_mask)
        else:
            hidden = self._decoder_hidden("policy", input_ids, attention_mask)
            out = self._logprobs_from_hidden("policy", hidden, input_ids, attention_mask, temperature, return_entropy)
            values = self._values_from_hidden(hidden, attention_mask)
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
        reference = {"params_bytes": 0, "device": str(self.device), "shared_with_base": self.use_lora}
        if not self.use_lora and self._reference_lm is not None:
            reference = {
                "params_bytes": _unique_bytes(list(self._reference_lm.parameters())),
                "device": str(self._reference_device),
                "shared_with_base": False,
            }
        report[REFERENCE] = reference
        report["total_bytes"] = total + reference["params_bytes"]
        return report

    def _base_params(self) -> list[nn.Parameter]:
        if self.use_lora:
            adapter = {id(p) for params in self._adapter_params.values() for p in params}
            return [p for p in self.causal_lm.parameters() if id(p) not in adapter]
        return list(self.policy_lm.parameters())

    # ------------------------------------------------------------------ state

    def role_state_dict(self, role: str) -> dict[str, torch.Tensor]:
        """Adapter (or, without LoRA, trunk) + head weights of one role; detached, not copied.

        Adapter keys are role-neutral (peft's format), so a state dict loads into any role, e.g. a
        trained "reward" adapter into the reward role of the PPO model.
        """
        self._require(role)
        state: dict[str, torch.Tensor] = {}
        if self.use_lora:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(self.peft_model, adapter_name=role)
            state.update({f"adapter.{k}": v.detach() for k, v in adapter.items()})
        elif self._role_owns_trunk(role):
            state.update({f"trunk.{k}": v.detach() for k, v in _dedup_state(self._trunk(role)).items()})
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
        if self.use_lora:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.peft_model, groups["adapter"], adapter_name=role)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if not groups["adapter"] or unexpected:
                raise ValueError(f"the state dict does not match the {role!r} adapter (unexpected: {unexpected[:3]})")
        elif self._role_owns_trunk(role):
            _load_trunk_state(self._trunk(role), groups["trunk"], role)
        if role in self.heads:
            self.heads[role].load_state_dict(groups["head"])
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
        return output_dir

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
        if not self.use_lora:
            merged = copy.deepcopy(self.policy_lm)
        else:
            merged = copy.deepcopy(self.peft_model).merge_and_unload(adapter_names=["policy"])
            # its copied checkpoint functions would call back into THIS RoleModel's adapter switching
            disable = getattr(merged, "activation_checkpointing_disable", None) or merged.gradient_checkpointing_disable
            if merged.supports_gradient_checkpointing:
                disable()
        return merged.requires_grad_(True)

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


def _scalar_head(hidden_size: int, std: float, device, dtype: torch.dtype) -> nn.Linear:
    head = nn.Linear(hidden_size, 1, device=device, dtype=dtype)
    nn.init.normal_(head.weight, std=std)
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


def _tied_names(module: nn.Module) -> set[str]:
    """State-dict names that alias an earlier parameter/buffer of `module` (tied embeddings).

    Ties are found by object identity through the module structure, never by data_ptr(): an FSDP2
    DTensor reports data_ptr() 0 for every parameter, and an empty local shard shares nothing."""
    seen: set[int] = set()
    tied: set[str] = set()
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied


def _dedup_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` without the tied aliases (safetensors refuses shared storage); the
    first name of a tie (the embedding, for tied lm_heads) is kept."""
    tied = _tied_names(module)
    return {key: value for key, value in module.state_dict().items() if key not in tied}


def _load_trunk_state(trunk: nn.Module, state: dict[str, torch.Tensor], role: str) -> None:
    """Load a full (unsharded) trunk state; tied aliases may be present or not."""
    from fastrlhf.distributed import load_full_state_dict

    tied = _tied_names(trunk)
    expected = set(trunk.state_dict())
    missing = sorted(expected - tied - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"trunk state of role {role!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if any(hasattr(p, "device_mesh") for p in trunk.parameters()):
        # FSDP2: copy each full tensor's shard into the DTensor (load_state_dict would mix Tensor and DTensor)
        load_full_state_dict(trunk, {k: v for k, v in state.items() if k not in tied})
    else:
        trunk.load_state_dict(state, strict=False)


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
