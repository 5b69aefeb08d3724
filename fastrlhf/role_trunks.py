"""The two ways a `RoleModel` holds the trunks (causal LMs) its roles run on.

`LoraTrunks`  one peft model: one adapter per role over ONE frozen base; the reference is that base
              with the adapters switched off.
`FullTrunks`  full fine-tuning: the policy trains the base itself (the value head rides on it), a
              reward role next to a policy gets its own deep copy, and the reference is a frozen copy
              kept outside the module tree (optionally on another device).

Both implement `RoleTrunks`: `RoleModel` asks them which trunk computes a role and under which
context, which parameters belong to a role, and how a role's state is saved, and never asks which
mode it is in. The trunks' modules are registered by `RoleModel` under the names in `modules`, so
state-dict keys, `.to()` and FSDP2 sharding see exactly these modules.

Parameters are looked up on every call and never cached: FSDP2 and other wrappers replace Parameter
objects, and a cached list would then miss the gradients.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import types
from typing import Callable, Iterator

import torch
from torch import nn

from fastrlhf._mixed_precision import find_tuner_layers, low_precision_lora
from fastrlhf.distributed import load_full_state_dict

# roles that run on a trunk of their own in full fine-tuning (value rides on the policy's)
TRUNK_ROLES = ("policy", "reward")


class RoleTrunks(abc.ABC):
    """What differs between LoRA and full fine-tuning, behind one interface.

    modules: {attribute name: module} that `RoleModel` registers as its submodules, in this order.
    state_group: key prefix of a role's trunk state in `RoleModel.role_state_dict` ("adapter"/"trunk").
    value_shares_policy_forward: one decoder forward serves the policy and the value head.
    reference_shares_base: the reference reads the base weights (no copy of its own).
    reference_lm: the frozen reference copy outside the module tree, or None.
    """

    modules: dict[str, nn.Module]
    state_group: str
    value_shares_policy_forward: bool
    reference_shares_base: bool
    reference_lm: nn.Module | None = None

    @property
    @abc.abstractmethod
    def causal_lm(self) -> nn.Module:
        """The causal LM of the policy (whose lm_head the roles share)."""

    @property
    def reference_device(self) -> torch.device:
        """Where the reference's weights live (the memory report's "reference" entry)."""
        return self.causal_lm.get_output_embeddings().weight.device

    @abc.abstractmethod
    def trunk(self, role: str) -> nn.Module:
        """The causal LM whose decoder computes the hidden states of a trained role."""

    @abc.abstractmethod
    def reference_trunk(self) -> nn.Module:
        """The causal LM whose decoder computes the reference's hidden states."""

    @abc.abstractmethod
    def reference_forward(self) -> contextlib.AbstractContextManager:
        """Context for the reference's decoder forward: no grad, the reference's weights."""

    def run_reference(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`fn()`: one pass of the reference (its decoder and whatever reads its LM head), in the
        reference's context. One call per pass: an FSDP-sharded reference gathers its weights for the
        call and frees them after it."""
        with self.reference_forward():
            return fn()

    def shard_reference(self, ctx, *, mixed_precision: torch.dtype | None = None) -> bool:
        """Shard a frozen reference copy with FSDP2 over `ctx`'s ranks; False when there is none."""
        return False

    def activate(self, role: str) -> None:
        """Prepare `role`'s trunk for its next forward (a no-op unless trunks are shared)."""

    def low_precision_forward(self) -> contextlib.AbstractContextManager:
        """Context for a trained role's decoder forward (see fastrlhf._mixed_precision)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def owned_params(self) -> dict[str, list[nn.Parameter]]:
        """{role: the trunk parameters that belong to it alone}, heads excluded."""

    @abc.abstractmethod
    def base_params(self) -> list[nn.Parameter]:
        """The base weights, counted once in the memory report."""

    @abc.abstractmethod
    def role_state(self, role: str) -> dict[str, torch.Tensor]:
        """`role`'s trunk state, detached (keys without the `state_group` prefix)."""

    @abc.abstractmethod
    def load_role_state(self, role: str, state: dict[str, torch.Tensor]) -> None:
        """Load what `role_state` returned (from this or another RoleModel) into `role`."""

    def checkpoint_kwargs(self) -> dict:
        """Extra activation-checkpointing kwargs (beyond use_reentrant=False)."""
        return {}

    def merged_policy(self) -> nn.Module:
        """A plain causal LM, a copy, with the policy's weights."""
        return self.merged_trunk("policy")

    @abc.abstractmethod
    def merged_trunk(self, role: str) -> nn.Module:
        """A plain causal LM, a copy, with the trunk weights of `role` (adapter merged in)."""


class LoraTrunks(RoleTrunks):
    """One peft model with one adapter per role on the shared frozen base.

    refresh_requires_grad: called after every adapter switch (peft's set_adapter and disable_adapter
        flip requires_grad; the RoleModel restores the trainable flags).
    """

    state_group = "adapter"
    value_shares_policy_forward = False
    reference_shares_base = True

    def __init__(self, base_model, roles: tuple[str, ...], lora_settings: dict,
                 refresh_requires_grad: Callable[[], None]):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.roles = roles
        self._refresh_requires_grad = refresh_requires_grad
        targets = lora_settings["lora_target_modules"]
        head_name = next(n for n, m in base_model.named_modules() if m is base_model.get_output_embeddings())
        if isinstance(targets, (list, tuple)) and any(head_name == t or head_name.endswith("." + t) for t in targets):
            # checked before peft wraps the base in place
            raise ValueError("lora_target_modules must not include the lm_head (it is shared by all roles)")
        config = LoraConfig(
            r=lora_settings["lora_r"],
            lora_alpha=lora_settings["lora_alpha"],
            lora_dropout=lora_settings["lora_dropout"],
            # "all-linear" = every linear layer of the decoder, never lm_head: the lm_head weight is
            # used directly by the fused log-prob kernel and must stay the shared base weight.
            target_modules=targets or "all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.peft_model = get_peft_model(base_model, config, adapter_name=roles[0])
        for role in roles[1:]:
            self.peft_model.add_adapter(role, config)
        if isinstance(self.causal_lm.get_output_embeddings(), BaseTunerLayer):
            raise ValueError("lora_target_modules must not include the lm_head (it is shared by all roles)")
        self.modules = {"peft_model": self.peft_model}
        # The RoleModel refreshes the trainable flags once it holds these trunks.
        self.peft_model.set_adapter(roles[0])
        self.active_adapter = roles[0]
        # peft's adapter layers (modules, never Parameters), for `low_precision_forward`
        self.tuner_layers = find_tuner_layers(self.peft_model)

    @property
    def causal_lm(self) -> nn.Module:
        """The LoRA-injected causal LM (every role's trunk)."""
        return self.peft_model.base_model.model

    def trunk(self, role: str) -> nn.Module:
        return self.causal_lm

    def reference_trunk(self) -> nn.Module:
        return self.causal_lm

    @contextlib.contextmanager
    def reference_forward(self) -> Iterator[None]:
        """The base alone: every adapter off, no grad."""
        try:
            with torch.no_grad(), self.peft_model.disable_adapter():
                yield
        finally:
            self._refresh_requires_grad()  # disable_adapter() flips requires_grad too

    def activate(self, role: str) -> None:
        """Make `role`'s adapter the active one.

        peft's set_adapter also sets requires_grad=True on the active adapter and False on all others.
        PPO backpropagates through the policy AND the value adapters in one step, and autograd drops
        the gradient of a leaf whose requires_grad is False at backward time, so the trainable flags
        are restored right after every switch. Switching does not touch a graph already recorded: each
        forward saved the tensors of the adapter that was active then.
        """
        if self.active_adapter != role:
            self.peft_model.set_adapter(role)
            self.active_adapter = role
            self._refresh_requires_grad()

    def low_precision_forward(self) -> contextlib.AbstractContextManager:
        """fp32 adapters over a bf16/fp16 base: autocast without peft's fp32 activation copies
        (see fastrlhf._mixed_precision); a no-op otherwise."""
        return low_precision_lora(self.causal_lm.get_output_embeddings().weight, self.tuner_layers)

    def adapter_params(self) -> dict[str, list[nn.Parameter]]:
        """{role: its LoRA parameters}, looked up by name."""
        params: dict[str, list[nn.Parameter]] = {role: [] for role in self.roles}
        for name, p in self.peft_model.named_parameters():
            parts = name.split(".")  # ...q_proj.lora_A.<role>.weight / ...lora_embedding_A.<role>
            at = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
            if at is not None and at + 1 < len(parts) and parts[at + 1] in params:
                params[parts[at + 1]].append(p)
        return params

    def owned_params(self) -> dict[str, list[nn.Parameter]]:
        return self.adapter_params()

    def base_params(self) -> list[nn.Parameter]:
        adapter = {id(p) for params in self.adapter_params().values() for p in params}
        return [p for p in self.causal_lm.parameters() if id(p) not in adapter]

    def role_state(self, role: str) -> dict[str, torch.Tensor]:
        """peft's adapter state: role-neutral keys, so it loads into any role (e.g. a reward adapter
        trained alone into the reward role of the PPO model)."""
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(self.peft_model, adapter_name=role)
        return {k: v.detach() for k, v in adapter.items()}

    def load_role_state(self, role: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft_model, state, adapter_name=role)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if not state or unexpected:
            raise ValueError(f"the state dict does not match the {role!r} adapter (unexpected: {unexpected[:3]})")

    def checkpoint_kwargs(self) -> dict:
        """The recomputation re-activates the adapter that was active in the forward: PPO switches from
        the policy to the value adapter between forward and backward, and a plain recompute would
        silently use the wrong adapter."""
        return {"context_fn": self._checkpoint_contexts}

    def _checkpoint_contexts(self):
        """torch.utils.checkpoint context_fn: (forward context, recompute context)."""
        return contextlib.nullcontext(), self._adapter_during(self.active_adapter)

    @contextlib.contextmanager
    def _adapter_during(self, role: str) -> Iterator[None]:
        previous = self.active_adapter
        self.activate(role)
        try:
            yield
        finally:
            self.activate(previous)

    def merged_trunk(self, role: str) -> nn.Module:
        merged = copy.deepcopy(self.peft_model).merge_and_unload(adapter_names=[role])
        # its copied checkpoint functions would call back into THIS model's adapter switching
        disable = getattr(merged, "activation_checkpointing_disable", None) or merged.gradient_checkpointing_disable
        if merged.supports_gradient_checkpointing:
            disable()
        return merged


class FullTrunks(RoleTrunks):
    """Full fine-tuning: `policy_lm` is the base itself (policy and value head, or the reward alone),
    `reward_lm` a copy for a reward role next to a policy, and a frozen reference copy.

    with_reference: False skips the reference copy; without a policy role there is none either
        (nothing to refer to).
    reference_device: where the reference copy lives (default: the base's device).
    """

    state_group = "trunk"
    value_shares_policy_forward = True
    reference_shares_base = False

    def __init__(self, base_model, roles: tuple[str, ...], *, with_reference: bool,
                 reference_device: torch.device | str | None):
        self.roles = roles
        base_model.requires_grad_(False)
        self.policy_lm = base_model
        self.modules = {"policy_lm": base_model}
        if "reward" in roles and "policy" in roles:
            self.reward_lm = copy.deepcopy(base_model)
            self.modules["reward_lm"] = self.reward_lm
        device = base_model.get_output_embeddings().weight.device
        self._reference_device = torch.device(reference_device) if reference_device is not None else device
        # An attribute of these trunks, not a submodule of the RoleModel: .to(), .parameters() and
        # state_dict() of the RoleModel must not move, train or save it.
        self.reference_lm = None
        self.reference_sharded = False  # shard_reference
        if with_reference and "policy" in roles:
            self.reference_lm = copy.deepcopy(base_model).to(self._reference_device).eval()

    @property
    def causal_lm(self) -> nn.Module:
        return self.policy_lm

    @property
    def reference_device(self) -> torch.device:
        return self._reference_device if self.reference_lm is not None else super().reference_device

    def trunk(self, role: str) -> nn.Module:
        return self.reward_lm if role == "reward" and "policy" in self.roles else self.policy_lm

    def reference_trunk(self) -> nn.Module:
        if self.reference_lm is None:
            raise ValueError(
                "this full fine-tuning RoleModel has no reference copy (with_reference=False, or no policy role)"
            )
        return self.reference_lm

    def reference_forward(self) -> contextlib.AbstractContextManager:
        return torch.no_grad()

    def run_reference(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_sharded:  # the registered forward method gathers and frees the weights
                return self.reference_lm.fastrlhf_reference_pass(fn)
            return fn()

    def shard_reference(self, ctx, *, mixed_precision: torch.dtype | None = None) -> bool:
        """Shard the frozen reference copy with FSDP2 like the policy (each decoder layer, then the
        copy as its own root), so that each rank holds 1/N of it: at Qwen2.5-72B PPO over 8 GPUs the
        unsharded copy was 135 of the 237 GiB predicted per GPU. A reference pass (`run_reference`)
        is a registered FSDP forward method of the copy: the layers are gathered one at a time in
        its decoder forward, the embeddings / final norm / LM head for the whole pass, and all are
        freed after it (no backward ever runs through the reference). A copy on another device type
        than the ranks' (e.g. `reference_device="cpu"`) stays whole where it is."""
        if self.reference_lm is None or self.reference_sharded or not ctx.distributed:
            return False
        if self._reference_device.type != ctx.device.type:
            return False
        self.reference_lm.fastrlhf_reference_pass = types.MethodType(_call, self.reference_lm)
        ctx.apply_fsdp(self.reference_lm, forward_methods=("fastrlhf_reference_pass",),
                       mixed_precision=mixed_precision, reshard_root_after_forward=True)
        self.reference_sharded = True
        return True

    def owned_params(self) -> dict[str, list[nn.Parameter]]:
        return {role: list(self.trunk(role).parameters()) if role in TRUNK_ROLES else [] for role in self.roles}

    def base_params(self) -> list[nn.Parameter]:
        return list(self.policy_lm.parameters())

    def role_state(self, role: str) -> dict[str, torch.Tensor]:
        if role not in TRUNK_ROLES:
            return {}
        return {k: v.detach() for k, v in _dedup_state(self.trunk(role)).items()}

    def load_role_state(self, role: str, state: dict[str, torch.Tensor]) -> None:
        if role in TRUNK_ROLES:
            _load_trunk_state(self.trunk(role), state, role)

    def merged_trunk(self, role: str) -> nn.Module:
        return copy.deepcopy(self.trunk(role))


def _call(module: nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The body of the reference copy's FSDP forward method (`FullTrunks.shard_reference`)."""
    return fn()


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
