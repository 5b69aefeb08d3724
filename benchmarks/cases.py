"""The benchmark cases: per kernel, the inputs, the providers (fastrlhf, its PyTorch reference eager
and under torch.compile, peers) and a bytes/FLOPs model for "achieved GB/s or TFLOP/s".

A provider is a function `inputs -> output`; the output is a tensor, a tuple of tensors, or a
`(loss, metrics)` pair. Backward is `torch.autograd.backward` over every output that requires grad
with fixed random upstream gradients, so providers compute exactly the same outputs per case.

Sweeps live in `sweep(kernel, device, quick)`: "quick" is a tiny subset, CPU sizes are small
(2 shared cores), GPU sizes are the ones that matter (N up to 64k tokens, V up to 152k, T up to 8k).
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmarks import peers

MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Provider:
    name: str
    fn: Callable[[dict], Any]
    # "" when usable on this device, else why not (written as the row's status)
    status: Callable[[str], str] = lambda device: ""
    differentiable: bool = True
    backend: str = ""  # what actually ran: "triton", "torch", "eager", "inductor", ...
    # mode -> (amount, unit) when this provider does different work than the case's model (the LM-head
    # rows count the GEMMs each algorithm executes: a recompute in backward is one more N·V·H GEMM)
    work: Callable[[str], tuple[float, str]] | None = None
    # appended to the row's note: what ran when a peer took another path than its best one
    note: str = ""
    # one of the strongest peers of its case: `--headline` runs fastrlhf against these only
    strong: bool = False


@dataclass
class Case:
    kernel: str
    shape: dict
    dtype: str
    make_inputs: Callable[[str], dict]
    providers: list[Provider]
    # mode -> (amount, unit): bytes with unit "GB/s", flops with unit "TFLOP/s"
    work: Callable[[str], tuple[float, str]]
    modes: tuple = MODES
    # (provider output, reference output, inputs) -> max abs difference on the tokens that count
    compare: Callable[[Any, Any, dict], float] | None = None
    note: str = ""

    @property
    def shape_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())


# ----------------------------------------------------------------------------- provider helpers


def fastrlhf_status(name: str) -> Callable[[str], str]:
    def status(device: str) -> str:
        try:
            getattr(importlib.import_module("fastrlhf.losses"), name)
        except Exception as exc:
            return f"not available yet ({type(exc).__name__}: {exc})"[:160]
        return ""
    return status


def reference_status(name: str) -> Callable[[str], str]:
    def status(device: str) -> str:
        try:
            getattr(importlib.import_module("fastrlhf.twins"), name)
        except Exception as exc:
            return f"not available yet ({type(exc).__name__}: {exc})"[:160]
        return ""
    return status


def fastrlhf_backend(device: str) -> str:
    # On CPU the suite measures the torch path (the one `backend="auto"` takes without
    # TRITON_INTERPRET): the Triton interpreter is a correctness tool, not something to time.
    return "triton" if device.startswith("cuda") else "torch"


def _losses(name):
    return getattr(importlib.import_module("fastrlhf.losses"), name)


def _reference(name):
    return getattr(importlib.import_module("fastrlhf.twins"), name)


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    import torch._dynamo as dynamo

    # Every shape of a sweep recompiles once; don't let dynamo fall back to eager after 8.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
    return torch.compile(_reference(name))


def standard_providers(name: str, call: Callable[[Callable, dict, str], Any], device: str, *,
                       differentiable: bool = True) -> list[Provider]:
    """fastrlhf, reference eager, reference under torch.compile, for public function `name`.
    `call(fn, inputs, backend)` invokes fn on the inputs (backend None for reference functions)."""
    backend = fastrlhf_backend(device)
    return [
        Provider("fastrlhf", lambda x: call(_losses(name), x, backend), fastrlhf_status(name),
                 differentiable, backend),
        Provider("torch-reference", lambda x: call(_reference(name), x, None), reference_status(name),
                 differentiable, "eager"),
        Provider("torch-compile", lambda x: call(compiled(name), x, None), reference_status(name),
                 differentiable, "inductor"),
    ]


def with_backend(fn, backend, *args, **kwargs):
    if backend is not None:
        kwargs["backend"] = backend
    return fn(*args, **kwargs)


def peer(module: str, *, needs_cuda: bool = False) -> Callable[[str], str]:
    return lambda device: peers.peer_status(module, needs_cuda=needs_cuda, device=device)


def _first(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def max_abs_diff(out, ref, inputs=None) -> float:
    a, b = _first(out), _first(ref)
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def masked_diff(mask_key: str):
    def compare(out, ref, inputs):
        m = inputs[mask_key].float()
        a, b = _first(out).detach().float(), _first(ref).detach().float()
        return float(((a - b) * m).abs().max()) if a.numel() else 0.0
    return compare


def _generator(dev: str) -> torch.Generator:
    """Seeded, on the target device: the big inputs (a 152k x 4096 weight) are made where they live."""
    return torch.Generator(device=dev).manual_seed(0)


def _randn(shape, g, dev) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=dev, dtype=torch.float32)


def elt(dtype: str) -> int:
    return torch.tensor([], dtype=DTYPES[dtype]).element_size()


# GEMM passes over the [rows, V, H] LM head (one pass = 2·rows·V·H FLOPs) that each algorithm
# executes, as (forward, backward): logits stored for backward (full logits), recomputed in backward
# (chunked heads that keep no logits: 8·N·V·H fwd+bwd), or all three GEMMs in the forward
# (gradients in the forward: Liger FLCE, fastrlhf's fused head: 6·N·V·H, backward only scales).
STORED, RECOMPUTE, IN_FORWARD = (1, 2), (1, 3), (3, 0)


def head_work(rows: float, V: int, H: int, passes: tuple[int, int], *, extra_forward: float = 0.0):
    """mode -> (FLOPs, "TFLOP/s") of an LM head over `rows` tokens; `extra_forward` passes are added
    to the forward (a no-grad reference forward in the DPO rows)."""
    mm = 2.0 * rows * V * H
    fwd, bwd = passes[0] + extra_forward, passes[1]

    def work(mode):
        return {"forward": fwd * mm, "backward": bwd * mm, "full": (fwd + bwd) * mm}[mode], "TFLOP/s"
    return work


# ----------------------------------------------------------------------------- token log-probs


def token_logprobs_case(N, V, H, dtype, device, *, entropy: bool) -> Case:
    dt = DTYPES[dtype]

    def make(dev):
        g = _generator(dev)
        hidden = (_randn((N, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        weight = (_randn((V, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=g, device=dev)
        return {"hidden": hidden, "weight": weight, "targets": targets}

    def call(fn, x, backend):
        return with_backend(fn, backend, x["hidden"], x["weight"], x["targets"], return_entropy=entropy)

    stored, recompute, in_forward = (head_work(N, V, H, p) for p in (STORED, RECOMPUTE, IN_FORWARD))
    trl_backend = "triton" if device.startswith("cuda") else "torch"
    # The weight trains here, so fastrlhf's backward remakes the logits (vocab tiles): 8·N·V·H.
    providers = standard_providers("token_logprobs", call, device)
    for p in providers:
        p.work = recompute

    def cute_logps(function, x):
        nll, ent = peers.liger_scaled_ce_apply(function, x["hidden"], x["weight"], x["targets"], entropy=entropy)
        return (-nll, ent) if entropy else -nll

    cute = liger_head_provider("liger-cute-head", device, dtype, cute_logps, work=recompute)
    if entropy:
        providers += [
            Provider("torch-full-logits", lambda x: peers.naive_token_logprobs_entropy(x["hidden"], x["weight"],
                                                                                       x["targets"]),
                     backend="eager", work=stored),
            Provider("trl-chunked", lambda x: peers.trl_chunked_logprobs(x["hidden"], x["weight"], x["targets"],
                                                                         return_entropy=True),
                     peer("trl.kernels"), backend=trl_backend, work=recompute, strong=True),
            cute,
        ]
    else:
        providers += [
            Provider("torch-full-logits", lambda x: peers.naive_token_logprobs(x["hidden"], x["weight"], x["targets"]),
                     backend="eager", work=stored),
            Provider("trl-full-logits", lambda x: peers.trl_full_logits_logprobs(x["hidden"], x["weight"],
                                                                                 x["targets"]),
                     peer("trl.trainer.utils"), backend="eager", work=stored, strong=True),
            Provider("trl-chunked", lambda x: peers.trl_chunked_logprobs(x["hidden"], x["weight"], x["targets"]),
                     peer("trl.kernels"), backend=trl_backend, work=recompute, strong=True),
            Provider("liger-flce", lambda x: peers.liger_flce_logprobs(x["hidden"], x["weight"], x["targets"]),
                     peer("liger_kernel.ops.fused_linear_cross_entropy", needs_cuda=True), backend="triton",
                     work=in_forward, strong=True),
            cute,
        ]

    kernel = "token_logprobs+entropy" if entropy else "token_logprobs"
    return Case(kernel, {"N": N, "V": V, "H": H}, dtype, make, providers, stored, compare=max_abs_diff,
                note="achieved = the GEMM FLOPs each provider executes (8·N·V·H fwd+bwd when the logits are "
                     "remade in backward, 6·N·V·H otherwise)")


def _device_key(device: str) -> tuple:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return "cuda", tuple(torch.cuda.get_device_capability(dev))
    return dev.type, None


def liger_head_provider(name: str, device: str, dtype: str, fn: Callable[[Any, dict], Any], *,
                        work: Callable[[str], tuple[float, str]]) -> Provider:
    """A provider built on Liger's per-token NLL (+ entropy) head, `fn(autograd function, inputs)`:
    the CuTe DSL kernel on sm_90 when nvidia-cutlass-dsl imports, else the torch loop Liger runs
    elsewhere (`peers.liger_scaled_ce`); the row's backend and note say which one ran. Either way it
    keeps no logits and remakes them in backward (8·N·V·H)."""
    function, backend, note = peers.liger_scaled_ce(*_device_key(device))

    def status(dev: str) -> str:
        if function is None:
            return note
        if backend == "cute-dsl" and dtype != "bf16":
            return "needs bf16 (Liger's CuTe head)"
        return ""

    return Provider(name, lambda x: fn(function, x), status, backend=backend, note=note if function else "",
                    strong=True, work=work)


# ----------------------------------------------------------------------------- log-probs from logits


def logprobs_from_logits_case(N, V, dtype, device, *, entropy: bool) -> Case:
    dt = DTYPES[dtype]

    def make(dev):
        g = _generator(dev)
        # One spare row so Liger's [B, L+1, V] helper reads the same storage without a copy.
        padded = (_randn((1, N + 1, V), g, dev) * 2).to(dt)
        logits = padded[0, :N].detach().requires_grad_()
        targets = torch.randint(0, V, (N,), generator=g, device=dev)
        return {"logits": logits, "padded": padded, "targets": targets}

    def call(fn, x, backend):
        return with_backend(fn, backend, x["logits"], x["targets"], return_entropy=entropy)

    providers = standard_providers("logprobs_from_logits", call, device)
    if entropy:
        providers += [
            Provider("trl-selective", lambda x: peers.trl_selective_log_softmax_and_entropy(x["logits"], x["targets"]),
                     peer("trl.trainer.utils"), backend="triton" if device.startswith("cuda") else "eager"),
        ]
    else:
        providers += [
            Provider("torch-naive", lambda x: peers.naive_logprobs_from_logits(x["logits"], x["targets"]),
                     backend="eager"),
            Provider("trl-selective", lambda x: peers.trl_selective_log_softmax(x["logits"], x["targets"]),
                     peer("trl.trainer.utils"), backend="triton" if device.startswith("cuda") else "eager"),
            Provider("openrlhf-fp32", lambda x: peers.openrlhf_logprobs(x["logits"], x["targets"]), backend="eager"),
            Provider("liger-selective", lambda x: peers.liger_selective_log_softmax(x["padded"], x["targets"]),
                     peer("liger_kernel.ops.grpo_loss", needs_cuda=True), differentiable=False, backend="triton"),
        ]

    def work(mode):
        logits_bytes = N * V * elt(dtype)
        return {"forward": logits_bytes, "backward": 2 * logits_bytes, "full": 3 * logits_bytes}[mode], "GB/s"

    kernel = "logprobs_from_logits+entropy" if entropy else "logprobs_from_logits"
    return Case(kernel, {"N": N, "V": V}, dtype, make, providers, work, compare=max_abs_diff)


# ----------------------------------------------------------------------------- per-token losses


def _token_tensors(B, T, dtype, dev, names, grad=(), seed=0):
    """Random [B, T] tensors plus a right-padded mask (each row keeps at least half its tokens)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[dtype]
    out = {}
    for name in names:
        if "logps" in name:
            t = -torch.rand(B, T, generator=g) * 3
        elif name == "entropy":
            t = torch.rand(B, T, generator=g) * 2
        else:
            t = torch.randn(B, T, generator=g)
        t = t.to(dev, dt)
        out[name] = t.requires_grad_() if name in grad else t
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    out["mask"] = (torch.arange(T)[None, :] < lengths[:, None]).to(dev)
    return out


def kl_case(B, T, dtype, device) -> Case:
    def make(dev):
        x = _token_tensors(B, T, dtype, dev, ["logps", "ref_logps"], grad=("logps",))
        return x

    def call(fn, x, backend):
        return with_backend(fn, backend, x["logps"], x["ref_logps"], estimator="k3")

    providers = standard_providers("kl_penalty", call, device) + [
        Provider("verl", lambda x: peers.verl_kl_penalty(x["logps"], x["ref_logps"], "k3"), backend="eager"),
        Provider("openrlhf", lambda x: peers.openrlhf_approx_kl(x["logps"], x["ref_logps"], "k3"), backend="eager"),
    ]
    e = elt(dtype)
    n = B * T

    def work(mode):
        return {"forward": 3 * n * e, "backward": 4 * n * e, "full": 7 * n * e}[mode], "GB/s"

    return Case("kl_penalty(k3)", {"B": B, "T": T}, dtype, make, providers, work, compare=max_abs_diff)


PPO_KW = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3",
              entropy_coef=0.01, loss_agg="token-mean")


# The objectives benchmarked next to plain PPO (same inputs, one option more): GSPO's sequence ratio
# (a [B] reduction before the kernel, one [B] load per token), TIS (one more [B, T] input).
PPO_OBJECTIVES = {
    "ppo": {},
    "gspo": dict(ratio_level="sequence", loss_agg="seq-mean-token-mean"),
    "tis": dict(is_correction="token_truncate", is_clip_max=2.0),
}


def ppo_case(B, T, dtype, device, objective: str = "ppo") -> Case:
    options = PPO_OBJECTIVES[objective]
    tis = "is_correction" in options

    def make(dev):
        names = ["logps", "old_logps", "advantages", "ref_logps", "entropy"] + (["rollout_logps"] if tis else [])
        return _token_tensors(B, T, dtype, dev, names, grad=("logps", "entropy"))

    def call(fn, x, backend):
        kwargs = dict(PPO_KW, **options)
        if tis:
            kwargs["rollout_logps"] = x["rollout_logps"]
        return with_backend(fn, backend, x["logps"], x["old_logps"], x["advantages"], x["mask"],
                            ref_logps=x["ref_logps"], entropy=x["entropy"], **kwargs)

    def verl(x):
        return peers.verl_ppo_objective(x["logps"], x["old_logps"], x["advantages"], x["mask"].float(),
                                        x["ref_logps"], x["entropy"], cliprange=0.2, cliprange_high=0.28,
                                        clip_ratio_c=3.0, kl_coef=0.05, entropy_coef=0.01)

    providers = standard_providers("ppo_loss", call, device)
    if objective == "ppo":
        providers.append(Provider("verl", verl, backend="eager"))
    e = elt(dtype)
    n = B * T
    extra = n * e if tis else 0  # the rollout log-probs

    def work(mode):
        # read logps, old, adv, ref, entropy, mask (+ rollout); write dlogps, dentropy
        return {"forward": 6 * n * e + extra, "backward": 8 * n * e + extra, "full": 8 * n * e + extra}[mode], "GB/s"

    name = "ppo_loss" if objective == "ppo" else f"ppo_loss({objective})"
    note = "policy clip (0.2/0.28) + dual clip 3 + k3 KL 0.05 + entropy 0.01, token-mean"
    if options:
        note += "; " + ", ".join(f"{k}={v}" for k, v in options.items())
    return Case(name, {"B": B, "T": T}, dtype, make, providers, work, compare=max_abs_diff, note=note)


def value_loss_case(B, T, dtype, device) -> Case:
    def make(dev):
        return _token_tensors(B, T, dtype, dev, ["values", "old_values", "returns"], grad=("values",))

    def call(fn, x, backend):
        return with_backend(fn, backend, x["values"], x["old_values"], x["returns"], x["mask"], clip_eps=0.2)

    providers = standard_providers("value_loss", call, device) + [
        Provider("trl", lambda x: peers.trl_value_loss(x["values"], x["old_values"], x["returns"], x["mask"].float()),
                 backend="eager")]
    e = elt(dtype)
    n = B * T

    def work(mode):
        return {"forward": 4 * n * e, "backward": 5 * n * e, "full": 5 * n * e}[mode], "GB/s"

    return Case("value_loss", {"B": B, "T": T}, dtype, make, providers, work, compare=max_abs_diff)


def gae_case(B, T, dtype, device) -> Case:
    def make(dev):
        x = _token_tensors(B, T, dtype, dev, ["rewards", "values"])
        m = x["mask"].to(x["rewards"].dtype)
        # Peers expect padded rewards/values already zeroed (TRL masks them before its loop).
        x["rewards"], x["values"] = x["rewards"] * m, x["values"] * m
        x["fmask"] = m
        return x

    def call(fn, x, backend):
        return with_backend(fn, backend, x["rewards"], x["values"], x["mask"], gamma=1.0, lam=0.95)

    providers = standard_providers("gae", call, device, differentiable=False) + [
        Provider("trl-loop", lambda x: peers.trl_gae(x["rewards"], x["values"], x["fmask"], 1.0, 0.95),
                 differentiable=False, backend="eager"),
        Provider("openrlhf-loop", lambda x: peers.openrlhf_gae(x["rewards"], x["values"], x["fmask"], 1.0, 0.95),
                 differentiable=False, backend="eager"),
        Provider("verl-loop", lambda x: peers.verl_gae(x["rewards"], x["values"], x["fmask"], 1.0, 0.95),
                 differentiable=False, backend="eager"),
    ]
    n = B * T

    def work(mode):
        return 5 * n * 4, "GB/s"  # read rewards, values, mask; write advantages, returns

    return Case("gae", {"B": B, "T": T}, dtype, make, providers, work, modes=("forward",),
                compare=masked_diff("fmask"))


def whiten_case(B, T, dtype, device) -> Case:
    def make(dev):
        x = _token_tensors(B, T, dtype, dev, ["x"])
        x["fmask"] = x["mask"].to(x["x"].dtype)
        return x

    def call(fn, x, backend):
        return with_backend(fn, backend, x["x"], x["mask"])

    providers = standard_providers("whiten", call, device, differentiable=False) + [
        Provider("trl", lambda x: peers.masked_whiten(x["x"], x["fmask"]) * x["fmask"], differentiable=False,
                 backend="eager")]
    n = B * T

    def work(mode):
        return 3 * n * elt(dtype), "GB/s"

    return Case("whiten", {"B": B, "T": T}, dtype, make, providers, work, modes=("forward",),
                compare=masked_diff("fmask"))


def group_advantages_case(B, G, dtype, device) -> Case:
    def make(dev):
        g = torch.Generator(device="cpu").manual_seed(0)
        return {"scores": torch.randn(B, generator=g).to(dev, DTYPES[dtype])}

    def call(fn, x, backend):
        return with_backend(fn, backend, x["scores"], G)

    providers = standard_providers("group_advantages", call, device, differentiable=False) + [
        Provider("trl-grpo", lambda x: peers.trl_group_advantages(x["scores"], G), differentiable=False,
                 backend="eager")]

    def work(mode):
        return 2 * B * elt(dtype), "GB/s"

    # TRL adds 1e-4 to an unbiased std, fastrlhf 1e-6 to the biased one: values differ slightly by design.
    return Case("group_advantages", {"B": B, "G": G}, dtype, make, providers, work, modes=("forward",),
                compare=max_abs_diff, note="TRL normalises by the unbiased std + 1e-4; fastrlhf biased std + 1e-6")


def dpo_case(B, dtype, device, loss_type="sigmoid") -> Case:
    def make(dev):
        g = torch.Generator(device="cpu").manual_seed(0)
        dt = DTYPES[dtype]
        names = ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
        x = {n: (-torch.rand(B, generator=g) * 200).to(dev, dt) for n in names}
        x["chosen_logps"].requires_grad_()
        x["rejected_logps"].requires_grad_()
        return x

    def call(fn, x, backend):
        return with_backend(fn, backend, x["chosen_logps"], x["rejected_logps"], x["ref_chosen_logps"],
                            x["ref_rejected_logps"], beta=0.1, loss_type=loss_type)

    providers = standard_providers("dpo_loss", call, device) + [
        Provider("trl", lambda x: peers.trl_dpo_loss(x["chosen_logps"], x["rejected_logps"], x["ref_chosen_logps"],
                                                     x["ref_rejected_logps"], beta=0.1, loss_type=loss_type),
                 backend="eager")]

    def work(mode):
        return {"forward": 4 * B * elt(dtype), "backward": 3 * B * elt(dtype), "full": 6 * B * elt(dtype)}[mode], "GB/s"

    return Case(f"dpo_loss({loss_type})", {"B": B}, dtype, make, providers, work, compare=max_abs_diff)


def kto_case(B, dtype, device) -> Case:
    """KTO on B unpaired rows, 60% desirable; the reference point from B KL rows (part of every
    provider's work: fastrlhf's `kto_kl` + `kto_loss`, TRL's clamp(mean) inside its loss)."""
    def make(dev):
        g = torch.Generator(device="cpu").manual_seed(0)
        dt = DTYPES[dtype]
        x = {n: (-torch.rand(B, generator=g) * 200).to(dev, dt)
             for n in ("policy_logps", "ref_logps", "kl_logps", "ref_kl_logps")}
        x["policy_logps"].requires_grad_()
        x["labels"] = (torch.rand(B, generator=g) < 0.6).to(dev)
        return x

    def call(fn, x, backend):
        kl = (_losses("kto_kl") if backend else _reference("kto_kl"))(x["kl_logps"], x["ref_kl_logps"])
        return with_backend(fn, backend, x["policy_logps"], x["ref_logps"], x["labels"], kl=kl, beta=0.1,
                            desirable_weight=1.33)

    providers = standard_providers("kto_loss", call, device) + [
        Provider("trl", lambda x: peers.trl_kto_loss(x["policy_logps"], x["ref_logps"], x["labels"], x["kl_logps"],
                                                     x["ref_kl_logps"], beta=0.1, desirable_weight=1.33),
                 backend="eager")]

    def work(mode):
        # forward: 4 log-probs + the labels read, the row gradient written; backward: gradient read and written
        return {"forward": (5 * elt(dtype) + 1) * B, "backward": (4 + elt(dtype)) * B,
                "full": (6 * elt(dtype) + 5) * B}[mode], "GB/s"

    return Case("kto_loss", {"B": B}, dtype, make, providers, work, compare=max_abs_diff)


def reward_loss_case(B, dtype, device) -> Case:
    def make(dev):
        g = torch.Generator(device="cpu").manual_seed(0)
        dt = DTYPES[dtype]
        return {"chosen": torch.randn(B, generator=g).to(dev, dt).requires_grad_(),
                "rejected": torch.randn(B, generator=g).to(dev, dt).requires_grad_()}

    def call(fn, x, backend):
        return with_backend(fn, backend, x["chosen"], x["rejected"], margin=0.5, center_coef=0.01)

    providers = standard_providers("reward_loss", call, device) + [
        Provider("trl", lambda x: peers.trl_reward_loss(x["chosen"], x["rejected"], 0.5, 0.01), backend="eager")]

    def work(mode):
        return {"forward": 2 * B * elt(dtype), "backward": 3 * B * elt(dtype), "full": 4 * B * elt(dtype)}[mode], "GB/s"

    return Case("reward_loss(bradley-terry)", {"B": B}, dtype, make, providers, work, compare=max_abs_diff)


# ----------------------------------------------------------------------------- DPO from hidden states


def _dpo_hidden_inputs(pairs, T, V, H, dtype):
    """make(dev) for the DPO head rows: policy and reference hidden states [2P, T, H] (chosen rows
    first), the LM head [V, H], targets [2P, T] with -100 on the prompt (the first quarter)."""
    dt = DTYPES[dtype]
    rows = 2 * pairs

    def make(dev):
        g = _generator(dev)
        hidden = (_randn((rows, T, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        ref_hidden = (_randn((rows, T, H), g, dev) / H ** 0.25).to(dt)
        weight = (_randn((V, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        targets = torch.randint(0, V, (rows, T), generator=g, device=dev)
        targets[:, : T // 4] = -100  # the prompt
        return {"hidden": hidden, "ref_hidden": ref_hidden, "weight": weight, "targets": targets}
    return make


def _dpo_from_logps(logps_fn, x, backend, pairs):
    """token log-probs (policy with grad, reference without) -> sequence sums -> sigmoid DPO, with
    fastrlhf's functions (backend set) or their twins (backend None)."""
    mask = x["targets"] != -100
    sequence_logps = _losses("sequence_logps") if backend else _reference("sequence_logps")
    dpo = _losses("dpo_loss") if backend else _reference("dpo_loss")
    logps = logps_fn(x["hidden"], x["weight"], x["targets"])
    with torch.no_grad():
        ref_logps = logps_fn(x["ref_hidden"], x["weight"].detach(), x["targets"])
    seq = sequence_logps(logps, mask)
    ref_seq = sequence_logps(ref_logps, mask)
    kw = {"backend": backend} if backend else {}
    return dpo(seq[:pairs], seq[pairs:], ref_seq[:pairs], ref_seq[pairs:], beta=0.1, **kw)


def _dpo_peers(pairs, V, H, n, device) -> list[Provider]:
    """The DPO-head peers shared by dpo_from_hidden and dpo_loss_from_hidden (n = 2P·T tokens)."""
    on_cuda = device.startswith("cuda")

    def trl_full_logits(x):
        def logps(h, w, t):
            lp = peers.trl_selective_log_softmax(h @ w.T, t.clamp(min=0))
            return lp * (t != -100)
        return _dpo_from_logps(logps, x, None, pairs)

    def trl_fused_head(x):
        """TRL 1.16 DPOTrainer: add_fused_lm_head log-probs -> sums -> its sigmoid loss."""
        mask = x["targets"] != -100
        logps, _ = peers.trl_fused_lm_head(x["hidden"], x["weight"], x["targets"])
        with torch.no_grad():
            ref_logps, _ = peers.trl_fused_lm_head(x["ref_hidden"], x["weight"].detach(), x["targets"])
        seq, ref_seq = (logps * mask).sum(-1), (ref_logps * mask).sum(-1)
        return peers.trl_dpo_loss(seq[:pairs], seq[pairs:], ref_seq[:pairs], ref_seq[pairs:], beta=0.1)

    def liger(x):
        return peers.liger_fused_linear_dpo(x["weight"], x["hidden"], x["targets"], x["ref_hidden"],
                                            x["weight"].detach(), beta=0.1, compiled=on_cuda)

    return [
        Provider("trl-full-logits", trl_full_logits, peer("trl.trainer.utils"), backend="eager",
                 work=head_work(n, V, H, STORED, extra_forward=1), strong=True),
        Provider("trl-fused-head", trl_fused_head, peer("trl.kernels"), backend="triton" if on_cuda else "torch",
                 work=head_work(n, V, H, RECOMPUTE, extra_forward=1), strong=True,
                 note="TRL 1.16 add_fused_lm_head: scores only the completion tokens on CUDA"),
        # On CPU Liger's torch.compile of every chunk would dominate a short run: measured eager there.
        Provider("liger-chunked-dpo", liger, peer("liger_kernel.chunked_loss"),
                 backend="inductor" if on_cuda else "eager", work=head_work(n, V, H, IN_FORWARD, extra_forward=1),
                 strong=True),
    ]


def dpo_from_hidden_case(pairs, T, V, H, dtype, device) -> Case:
    """The whole DPO head through the recompute path: policy and reference hidden states [2P, T, H]
    -> token_logprobs (reference without grad) -> sequence sums -> sigmoid DPO. The fused head is
    the dpo_loss_from_hidden row; TRL's ways = full logits + selective_log_softmax, or its 1.16
    fused LM head; Liger = chunked fused-linear DPO."""
    backend = fastrlhf_backend(device)
    n = 2 * pairs * T

    def fast(x):
        fn = _losses("token_logprobs")
        return _dpo_from_logps(lambda h, w, t: fn(h, w, t, backend=backend), x, backend, pairs)

    def reference(x):
        return _dpo_from_logps(_reference("token_logprobs"), x, None, pairs)

    recompute = head_work(n, V, H, RECOMPUTE, extra_forward=1)
    providers = [
        Provider("fastrlhf", fast, fastrlhf_status("token_logprobs"), backend=backend, work=recompute),
        Provider("torch-reference", reference, reference_status("token_logprobs"), backend="eager", work=recompute),
    ] + _dpo_peers(pairs, V, H, n, device)
    return Case("dpo_from_hidden", {"pairs": pairs, "T": T, "V": V, "H": H}, dtype, _dpo_hidden_inputs(pairs, T, V, H, dtype),
                providers, recompute, compare=max_abs_diff, note="policy fwd+bwd, reference fwd (no grad), sigmoid DPO")


def dpo_loss_from_hidden_case(pairs, T, V, H, dtype, device) -> Case:
    """The DPO head as the trainers run it with the fused head: the reference's sequence log-probs
    from `token_logprobs` without grad (2·N·V·H), then `dpo_loss_from_hidden` on the policy's hidden
    states (gradients in its forward, 6·N·V·H while a pair's 2T rows fit one chunk)."""
    backend = fastrlhf_backend(device)
    n = 2 * pairs * T

    def head(fused, logps_fn, sequence_logps, x, **kw):
        mask = x["targets"] != -100
        with torch.no_grad():
            ref = sequence_logps(logps_fn(x["ref_hidden"], x["weight"].detach(), x["targets"], **kw), mask)
        return fused(x["hidden"], x["weight"], x["targets"], ref[:pairs], ref[pairs:], beta=0.1, **kw)

    def fast(x):
        return head(_losses("dpo_loss_from_hidden"), _losses("token_logprobs"), _losses("sequence_logps"), x,
                    backend=backend)

    def reference(x):
        return head(_reference("dpo_loss_from_hidden"), _reference("token_logprobs"), _reference("sequence_logps"), x)

    fused = head_work(n, V, H, IN_FORWARD, extra_forward=1)
    providers = [
        Provider("fastrlhf", fast, fastrlhf_status("dpo_loss_from_hidden"), backend=backend,
                 work=fused if backend == "triton" else head_work(n, V, H, RECOMPUTE, extra_forward=1)),
        Provider("torch-reference", reference, reference_status("dpo_loss_from_hidden"), backend="eager",
                 work=head_work(n, V, H, RECOMPUTE, extra_forward=1)),
    ] + _dpo_peers(pairs, V, H, n, device)
    return Case("dpo_loss_from_hidden", {"pairs": pairs, "T": T, "V": V, "H": H}, dtype,
                _dpo_hidden_inputs(pairs, T, V, H, dtype), providers, fused, compare=max_abs_diff,
                note="policy fwd+bwd, reference fwd (no grad), sigmoid DPO; achieved = the GEMM FLOPs each "
                     "provider executes")


# ----------------------------------------------------------------------------- the fused RL head

# GRPO as the peers implement it: token-level clip 0.2 / 0.28, k3 KL to the reference (beta 0.04),
# token-mean over the batch (Liger's and TRL's "bnpo"), no entropy bonus (Liger's GRPO loss has none).
POLICY_KW = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04, kl_estimator="k3", entropy_coef=0.0,
                 loss_agg="token-mean")


def _policy_inputs(B, T, V, H, dtype):
    """make(dev) for the policy-loss rows: hidden [B, T, H], LM head [V, H], targets [B, T] (-100
    outside the completion mask), sequence advantages [B] (token-level copy too), and rollout /
    reference log-probs near the current ones (|log ratio| ~ 0.1, so the clip is active on a few
    percent of tokens, as in training) computed by a no-grad forward."""
    dt = DTYPES[dtype]

    def make(dev):
        g = _generator(dev)
        hidden = (_randn((B, T, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        weight = (_randn((V, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        mask = _token_tensors(B, T, "fp32", dev, [])["mask"]
        targets = torch.randint(0, V, (B, T), generator=g, device=dev).masked_fill(~mask, -100)
        with torch.no_grad():
            logps = _losses("token_logprobs")(hidden, weight, targets).float()
        old_logps = logps + 0.1 * _randn((B, T), g, dev)
        ref_logps = logps + 0.1 * _randn((B, T), g, dev)
        advantages = _randn((B,), g, dev)
        return {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask, "old_logps": old_logps,
                "ref_logps": ref_logps, "seq_advantages": advantages,
                "advantages": advantages[:, None].expand(B, T).contiguous()}
    return make


def _valid_tokens(B, T) -> int:
    """Tokens inside the mask of `_policy_inputs` (the mask comes from a CPU generator: the same on any device)."""
    return int(_token_tensors(B, T, "fp32", "cpu", [])["mask"].sum())


def _policy_loss_after_head(logps, entropy, x):
    """The PPO/GRPO loss of the peers' pipelines: fastrlhf's PyTorch twin of ppo_loss under
    torch.compile (clip, KL, token-mean; the entropy as a metric only, as GRPOTrainer logs it)."""
    return compiled("ppo_loss")(logps, x["old_logps"], x["advantages"], x["mask"], ref_logps=x["ref_logps"],
                                entropy=None if entropy is None else entropy.detach(), **POLICY_KW)


def policy_loss_from_hidden_case(B, T, V, H, dtype, device) -> Case:
    """GRPO's policy loss from the final hidden states: log-probs (+ entropy) and the clipped,
    KL-penalised objective. fastrlhf = `policy_loss_from_hidden` (gradients in the forward, 6·N·V·H);
    TRL 1.16 = its fused LM head (`add_fused_lm_head`, log-probs + entropy, logits remade in backward)
    + the loss under torch.compile; Liger = `LigerFusedLinearGRPOLoss`, and its per-token NLL +
    entropy head (CuTe DSL on sm_90, the head verl uses) + the loss under torch.compile."""
    backend = fastrlhf_backend(device)
    n = B * T

    def fast(x):
        return _losses("policy_loss_from_hidden")(x["hidden"], x["weight"], x["targets"], x["old_logps"],
                                                  x["advantages"], x["mask"], ref_logps=x["ref_logps"],
                                                  backend=backend, **POLICY_KW)

    def reference(x):
        return _reference("policy_loss_from_hidden")(x["hidden"], x["weight"], x["targets"], x["old_logps"],
                                                     x["advantages"], x["mask"], ref_logps=x["ref_logps"], **POLICY_KW)

    def trl(x):
        logps, entropy = peers.trl_fused_lm_head(x["hidden"], x["weight"], x["targets"], entropy=True)
        return _policy_loss_after_head(logps, entropy, x)

    def cute(function, x):
        nll, entropy = peers.liger_scaled_ce_apply(function, x["hidden"].reshape(n, H), x["weight"],
                                                   x["targets"].reshape(n), entropy=True)
        return _policy_loss_after_head(-nll.view(B, T), entropy.view(B, T), x)

    on_cuda = device.startswith("cuda")

    def liger_grpo(x):
        return peers.liger_fused_linear_grpo(x["hidden"], x["weight"], x["targets"].clamp(min=0), x["mask"].long(),
                                             x["seq_advantages"], x["old_logps"], x["ref_logps"], compiled=on_cuda)

    recompute = head_work(n, V, H, RECOMPUTE)
    providers = [
        Provider("fastrlhf", fast, fastrlhf_status("policy_loss_from_hidden"), backend=backend,
                 work=head_work(n, V, H, IN_FORWARD) if backend == "triton" else recompute),
        Provider("torch-reference", reference, reference_status("policy_loss_from_hidden"), backend="eager",
                 work=recompute),
        Provider("trl-fused-head+compiled-loss", trl, peer("trl.kernels"), backend="triton" if on_cuda else "torch",
                 work=head_work(_valid_tokens(B, T) if on_cuda else n, V, H, RECOMPUTE), strong=True,
                 note="TRL 1.16 add_fused_lm_head (scores only the masked-in tokens on CUDA) + ppo_loss twin under "
                      "torch.compile"),
        liger_head_provider("liger-cute-head+compiled-loss", device, dtype, cute, work=recompute),
        Provider("liger-fused-linear-grpo", liger_grpo, peer("liger_kernel.chunked_loss"),
                 backend="inductor" if on_cuda else "eager", work=recompute, strong=True,
                 note="LigerFusedLinearGRPOLoss(loss_type='bnpo'), no entropy computed"
                      + ("" if on_cuda else "; compiled=False on CPU")),
    ]
    return Case("policy_loss_from_hidden", {"B": B, "T": T, "V": V, "H": H}, dtype, _policy_inputs(B, T, V, H, dtype),
                providers, head_work(n, V, H, IN_FORWARD), modes=("full",), compare=max_abs_diff,
                note="GRPO: clip 0.2/0.28, k3 KL 0.04, token-mean, entropy as a metric; achieved = the GEMM FLOPs "
                     "each provider executes")


def sft_loss_from_hidden_case(B, T, V, H, dtype, device) -> Case:
    """The SFT loss from hidden states [B, T, H] with the prompt (first quarter) masked out:
    mean NLL over the completion tokens."""
    dt = DTYPES[dtype]
    backend = fastrlhf_backend(device)
    n = B * T

    def make(dev):
        g = _generator(dev)
        hidden = (_randn((B, T, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        weight = (_randn((V, H), g, dev) / H ** 0.25).to(dt).requires_grad_()
        targets = torch.randint(0, V, (B, T), generator=g, device=dev)
        targets[:, : T // 4] = -100
        return {"hidden": hidden, "weight": weight, "targets": targets}

    def trl(x):
        logps, _ = peers.trl_fused_lm_head(x["hidden"], x["weight"], x["targets"])
        return -logps.sum() / (x["targets"] != -100).sum().clamp(min=1)

    def cute(function, x):
        nll, _ = peers.liger_scaled_ce_apply(function, x["hidden"].reshape(n, H), x["weight"], x["targets"].reshape(n),
                                             entropy=False)
        return nll.sum() / (x["targets"] != -100).sum().clamp(min=1)

    on_cuda = device.startswith("cuda")
    valid = B * (T - T // 4)
    recompute = head_work(n, V, H, RECOMPUTE)
    providers = [
        Provider("fastrlhf", lambda x: _losses("sft_loss_from_hidden")(x["hidden"], x["weight"], x["targets"],
                                                                       backend=backend),
                 fastrlhf_status("sft_loss_from_hidden"), backend=backend,
                 work=head_work(n, V, H, IN_FORWARD) if backend == "triton" else recompute),
        Provider("torch-reference", lambda x: _reference("sft_loss_from_hidden")(x["hidden"], x["weight"], x["targets"]),
                 reference_status("sft_loss_from_hidden"), backend="eager", work=recompute),
        Provider("hf-full-logits", lambda x: peers.hf_causal_lm_loss(x["hidden"], x["weight"], x["targets"]),
                 backend="eager", work=head_work(n, V, H, STORED), strong=True,
                 note="a transformers model's own loss: full logits upcast to fp32 + cross_entropy"),
        Provider("trl-fused-head", trl, peer("trl.kernels"), backend="triton" if on_cuda else "torch",
                 work=head_work(valid if on_cuda else n, V, H, RECOMPUTE), strong=True,
                 note="TRL 1.16 add_fused_lm_head (SFTTrainer); scores only the completion tokens on CUDA"),
        Provider("liger-flce", lambda x: peers.liger_flce_mean(x["hidden"].reshape(n, H), x["weight"],
                                                               x["targets"].reshape(n)),
                 peer("liger_kernel.ops.fused_linear_cross_entropy", needs_cuda=True), backend="triton",
                 work=head_work(n, V, H, IN_FORWARD), strong=True),
        liger_head_provider("liger-cute-head", device, dtype, cute, work=recompute),
    ]
    return Case("sft_loss_from_hidden", {"B": B, "T": T, "V": V, "H": H}, dtype, make, providers,
                head_work(n, V, H, IN_FORWARD), modes=("full",), compare=max_abs_diff,
                note="mean NLL over the completion (prompt = first quarter masked); achieved = the GEMM FLOPs "
                     "each provider executes")


# ----------------------------------------------------------------------------- GRPO from logits

GRPO_KW = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04, kl_estimator="k3", loss_agg="token-mean")


def _grpo_head(policy_loss_from_logits, x, backend):
    kw = {"backend": backend} if backend else {}
    # The model's [B, L+1, V] logits as they are (next-token layout), as Liger's GRPO loss takes them.
    return policy_loss_from_logits(x["padded"], x["ids"], x["old_logps"], x["advantages"], x["mask"],
                                   ref_logps=x["ref_logps"], **GRPO_KW, **kw)


def _grpo_reference(x):
    return _grpo_head(_reference("policy_loss_from_logits"), x, None)


@functools.lru_cache(maxsize=None)
def _grpo_compiled():
    compiled("ppo_loss")  # raises dynamo's recompile limits
    return torch.compile(_grpo_reference)


def grpo_from_logits_case(B, L, V, dtype, device) -> Case:
    """GRPO's per-token objective from the logits: log-softmax + gather, token-level clipped ratio
    with sequence advantages, k3 KL to the reference (beta 0.04), token-mean ("bnpo").
    Liger fuses exactly this in `triton_grpo_loss`; TRL's GRPOTrainer does it op by op; fastrlhf's
    `policy_loss_from_logits` writes the logits' gradient in the forward (its reference row is the
    twin: `logprobs_from_logits` + `ppo_loss`)."""
    dt = DTYPES[dtype]

    def make(dev):
        g = _generator(dev)
        padded = (_randn((B, L + 1, V), g, dev) * 2).to(dt).requires_grad_()
        ids = torch.randint(0, V, (B, L), generator=g, device=dev)
        x = _token_tensors(B, L, "fp32", dev, ["old_logps", "ref_logps"])
        x["old_logps"] = x["old_logps"] - 10.0  # log-probs of random logits over V are ~ -log V
        x["ref_logps"] = x["ref_logps"] - 10.0
        x["mask"] = x["mask"].long()  # TRL's completion_mask is an integer tensor
        return dict(x, padded=padded, ids=ids, advantages=_randn((B,), g, dev))

    backend = fastrlhf_backend(device)

    def fast(x):
        return _grpo_head(_losses("policy_loss_from_logits"), x, backend)

    def trl_style(x):
        """TRL GRPOTrainer (trl/trainer/grpo_trainer.py, _compute_loss, loss_type="bnpo", token-level IS)."""
        per_token_logps = peers.trl_selective_log_softmax(x["padded"][:, :-1], x["ids"])
        ref, mask, adv = x["ref_logps"], x["mask"], x["advantages"][:, None]
        coef_1 = torch.exp(per_token_logps - x["old_logps"])
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) + 0.04 * per_token_kl
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)

    def liger(x):
        grpo, _ = peers._import("liger_kernel.transformers.grpo_loss")
        loss, _metrics = grpo.triton_grpo_loss(
            x["padded"], x["old_logps"], x["ref_logps"], x["ids"], x["advantages"], x["mask"], temperature=1.0,
            beta=0.04, eps_low=0.2, eps_high=0.28, inplace=False, loss_type="bnpo", reduce=True)
        return loss

    providers = [
        Provider("fastrlhf", fast, fastrlhf_status("policy_loss_from_logits"), backend=backend),
        Provider("torch-reference", _grpo_reference, reference_status("policy_loss_from_logits"), backend="eager"),
        Provider("torch-compile", lambda x: _grpo_compiled()(x), reference_status("policy_loss_from_logits"),
                 backend="inductor"),
        Provider("trl-style", trl_style, peer("trl.trainer.utils"),
                 backend="triton" if device.startswith("cuda") else "eager", strong=True),
        Provider("liger-grpo", liger, peer("liger_kernel.transformers.grpo_loss", needs_cuda=True),
                 backend="triton", strong=True),
    ]

    def work(mode):
        # The logits read twice and their gradient written once (fastrlhf in its forward, Liger's
        # forward + backward): the bytes of the whole step, the same for every provider.
        logits_bytes = B * (L + 1) * V * elt(dtype)
        return {"forward": logits_bytes, "backward": 2 * logits_bytes, "full": 3 * logits_bytes}[mode], "GB/s"

    return Case("grpo_from_logits", {"B": B, "L": L, "V": V}, dtype, make, providers, work, compare=max_abs_diff,
                note="clip 0.2/0.28, k3 KL beta 0.04, token-mean; sequence advantages")


# ----------------------------------------------------------------------------- sweeps

KERNELS = ("policy_loss_from_hidden", "token_logprobs", "token_logprobs+entropy", "logprobs_from_logits",
           "logprobs_from_logits+entropy", "kl_penalty", "ppo_loss", "value_loss", "gae", "whiten",
           "group_advantages", "dpo_loss", "kto_loss", "reward_loss", "dpo_from_hidden", "dpo_loss_from_hidden",
           "sft_loss_from_hidden", "grpo_from_logits", "ceilings")

# The rows issue 14's targets are about, in the order a short GPU run measures them: the device's
# own ceilings first (for "% of measured"), then the fused policy head. (kernel, GPU shape, CPU shape).
HEADLINE = (
    ("ceilings", None, None),
    ("policy_loss_from_hidden", (16, 1024, 151936, 4096, "bf16"), (2, 64, 4096, 64, "fp32")),
    ("token_logprobs", (16384, 151936, 4096, "bf16"), (256, 32000, 64, "fp32")),
    ("grpo_from_logits", (16, 1024, 151936, "bf16"), (4, 64, 4096, "fp32")),
    ("dpo_loss_from_hidden", (4, 1024, 151936, 2048, "bf16"), (2, 64, 4096, 64, "fp32")),
    ("dpo_from_hidden", (4, 1024, 151936, 2048, "bf16"), (2, 64, 4096, 64, "fp32")),
    ("sft_loss_from_hidden", (16, 1024, 151936, 4096, "bf16"), (2, 64, 4096, 64, "fp32")),
)


def _make_case(kernel: str, args: tuple, device: str) -> Case:
    if kernel in ("token_logprobs", "token_logprobs+entropy"):
        return token_logprobs_case(*args, device, entropy=kernel.endswith("entropy"))
    return {"policy_loss_from_hidden": policy_loss_from_hidden_case, "grpo_from_logits": grpo_from_logits_case,
            "dpo_loss_from_hidden": dpo_loss_from_hidden_case, "dpo_from_hidden": dpo_from_hidden_case,
            "sft_loss_from_hidden": sft_loss_from_hidden_case}[kernel](*args, device)


def headline(device: str) -> list[Case]:
    """The headline cases in priority order (GPU: issue 14's target shapes; CPU: small stand-ins)."""
    gpu = device.startswith("cuda")
    out = []
    for kernel, gpu_args, cpu_args in HEADLINE:
        if kernel == "ceilings":
            out += ceiling_cases(device)
        else:
            out.append(_make_case(kernel, gpu_args if gpu else cpu_args, device))
    return out


def headline_keys(device: str) -> set[tuple]:
    """(kernel, shape, dtype) of the headline cases, to leave them out of the rest of a sweep."""
    return {(c.kernel, c.shape_str, c.dtype) for c in headline(device)}


# ----------------------------------------------------------------------------- the device's ceilings


def ceiling_cases(device: str) -> list[Case]:
    """What this device reaches on a plain bf16 GEMM (cuBLAS, 8192^3, random data) and a device-to-
    device copy (bytes read + written): the practical ceilings the "% of peak" columns are read
    against (METHOD.md: datasheet peaks are leads, measure the ceilings once)."""
    gpu = device.startswith("cuda")
    M, dtype = (8192, "bf16") if gpu else (512, "fp32")
    n_copy = (1 << 30) if gpu else (1 << 24)  # elements of fp32: 4 GiB / 64 MiB

    def make_gemm(dev):
        g = _generator(dev)
        return {"a": _randn((M, M), g, dev).to(DTYPES[dtype]), "b": _randn((M, M), g, dev).to(DTYPES[dtype])}

    def make_copy(dev):
        return {"src": torch.rand(n_copy, generator=_generator(dev), device=dev), "dst": torch.empty(n_copy, device=dev)}

    gemm = Case("ceiling:gemm", {"M": M, "N": M, "K": M}, dtype, make_gemm,
                [Provider("torch-matmul", lambda x: torch.mm(x["a"], x["b"]), differentiable=False,
                          backend="cublas" if gpu else "torch")],
                lambda mode: (2.0 * M ** 3, "TFLOP/s"), modes=("forward",),
                note="the device's practical matmul ceiling (random data)")
    copy = Case("ceiling:copy", {"N": n_copy}, "fp32", make_copy,
                [Provider("torch-copy", lambda x: x["dst"].copy_(x["src"]), differentiable=False, backend="torch")],
                lambda mode: (8.0 * n_copy, "GB/s"), modes=("forward",),
                note="the device's practical memory bandwidth: bytes read + written by a device-to-device copy")
    return [gemm, copy]




def sweep(kernel: str, device: str, quick: bool) -> list[Case]:
    """The cases of one kernel family, most informative first (a time budget cuts from the end)."""
    gpu = device.startswith("cuda")
    C = []
    if kernel == "ceilings":
        C = ceiling_cases(device)
    elif kernel in ("policy_loss_from_hidden", "sft_loss_from_hidden"):
        if gpu:
            grid = [(4, 512, 32000, 2048, "bf16")] if quick else [(16, 1024, 151936, 4096, "bf16"),
                                                                   (4, 1024, 151936, 4096, "bf16"),
                                                                   (16, 1024, 151936, 2048, "bf16"),
                                                                   (16, 1024, 128256, 4096, "bf16")]
        else:
            grid = [(2, 64, 4096, 64, "fp32")] if quick else [(2, 64, 4096, 64, "fp32"), (4, 128, 16000, 64, "fp32")]
        C = [_make_case(kernel, args, device) for args in grid]
    elif kernel == "dpo_loss_from_hidden":
        if gpu:
            grid = [(2, 512, 32000, 2048, "bf16")] if quick else [(4, 1024, 151936, 2048, "bf16"),
                                                                   (8, 2048, 151936, 2048, "bf16")]
        else:
            grid = [(2, 64, 4096, 64, "fp32")] if quick else [(2, 128, 16000, 64, "fp32")]
        C = [dpo_loss_from_hidden_case(p, t, v, h, dt, device) for p, t, v, h, dt in grid]
    elif kernel in ("token_logprobs", "token_logprobs+entropy"):
        ent = kernel.endswith("entropy")
        if gpu and quick:
            grid = [(4096, 32000, 2048, "bf16")]
        elif gpu:
            V, H = 151936, 4096
            grid = [(n, V, H, "bf16") for n in (4096, 16384, 65536)]
            if not ent:
                grid += [(16384, 32000, 4096, "bf16"), (16384, 128256, 4096, "bf16"), (16384, V, 2048, "bf16"),
                         (4096, 128256, 4096, "fp32")]
        elif quick:
            grid = [(n, 32000, 64, "fp32") for n in ((256, 1024) if not ent else (256,))]
        else:
            grid = [(n, 32000, 128, "fp32") for n in (256, 1024, 4096)] + [(1024, 32000, 128, "bf16")]
        C = [token_logprobs_case(n, v, h, dt, device, entropy=ent) for n, v, h, dt in grid]
    elif kernel in ("logprobs_from_logits", "logprobs_from_logits+entropy"):
        ent = kernel.endswith("entropy")
        if gpu and quick:
            grid = [(4096, 32000, "bf16")]
        elif gpu:
            grid = [(n, 151936, "bf16") for n in (4096, 16384, 65536 if not ent else 32768)]
            if not ent:
                grid += [(16384, 32000, "bf16"), (16384, 128256, "bf16"), (16384, 151936, "fp32")]
        elif quick:
            grid = [(n, 32000, "fp32") for n in ((256, 1024) if not ent else (256,))]
        else:
            grid = [(n, 32000, "fp32") for n in (256, 1024, 4096)] + [(1024, 32000, "bf16")]
        C = [logprobs_from_logits_case(n, v, dt, device, entropy=ent) for n, v, dt in grid]
    elif kernel == "gae":
        if gpu:
            Ts = (1024,) if quick else (512, 2048, 8192)
            C = [gae_case(32, t, "fp32", device) for t in Ts]
        else:
            Ts = (256, 1024) if quick else (256, 1024, 4096)
            C = [gae_case(16, t, "fp32", device) for t in Ts]
    elif kernel in ("kl_penalty", "ppo_loss", "value_loss", "whiten"):
        make = {"kl_penalty": kl_case, "ppo_loss": ppo_case, "value_loss": value_loss_case,
                "whiten": whiten_case}[kernel]
        if gpu:
            grid = [(64, 1024, "bf16")] if quick else [(64, 1024, "bf16"), (256, 2048, "bf16"), (512, 4096, "bf16"),
                                                        (256, 2048, "fp32")]
        else:
            grid = [(8, 512, "fp32")] if quick else [(8, 512, "fp32"), (32, 1024, "fp32"), (64, 2048, "fp32")]
        C = [make(b, t, dt, device) for b, t, dt in grid]
        if kernel == "ppo_loss":  # GSPO and TIS next to plain PPO at the first shape
            C[1:1] = [ppo_case(*grid[0], device, objective=o) for o in PPO_OBJECTIVES if o != "ppo"]
    elif kernel == "group_advantages":
        Bs = ((4096,) if quick else (1024, 16384, 262144)) if gpu else ((512,) if quick else (512, 8192))
        C = [group_advantages_case(b, 16, "fp32", device) for b in Bs]
    elif kernel == "dpo_loss":
        Bs = ((1024,) if quick else (64, 4096, 262144)) if gpu else ((256,) if quick else (256, 8192))
        C = [dpo_case(b, "fp32", device) for b in Bs]
    elif kernel == "kto_loss":
        Bs = ((1024,) if quick else (64, 4096, 262144)) if gpu else ((256,) if quick else (256, 8192))
        C = [kto_case(b, "fp32", device) for b in Bs]
    elif kernel == "reward_loss":
        Bs = ((1024,) if quick else (64, 4096, 262144)) if gpu else ((256,) if quick else (256, 8192))
        C = [reward_loss_case(b, "fp32", device) for b in Bs]
    elif kernel == "dpo_from_hidden":
        if gpu:
            grid = [(2, 512, 32000, 2048, "bf16")] if quick else [(4, 1024, 151936, 2048, "bf16"),
                                                                   (8, 2048, 151936, 2048, "bf16")]
        else:
            grid = [(2, 64, 4096, 64, "fp32")] if quick else [(2, 128, 16000, 64, "fp32")]
        C = [dpo_from_hidden_case(p, t, v, h, dt, device) for p, t, v, h, dt in grid]
    elif kernel == "grpo_from_logits":
        if gpu:
            grid = [(8, 512, 32000, "bf16")] if quick else [(16, 1024, 151936, "bf16"), (64, 1024, 151936, "bf16")]
        else:
            grid = [(4, 64, 4096, "fp32")] if quick else [(8, 128, 32000, "fp32")]
        C = [grpo_from_logits_case(b, length, v, dt, device) for b, length, v, dt in grid]
    else:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    return C
