"""Will this training step fit on my GPU? The answer the planner prints, built on `simulate`.

    plan = make_plan(StepSpec("ppo", batch_size=8, seq_len=2048, prompt_len=1024), config, "Qwen2.5-7B",
                     gpu_memory_gib=80)
    print(format_plan(plan))

For the configuration given it predicts the peak per GPU with activation checkpointing off and on,
with the parameters, gradients and optimizer state sharded by FSDP over 2, 4, ... GPUs (activations
and temporaries not sharded; FSDP's per-layer all-gather buffers, about two layers of weights, are
not counted), whether it fits, and the largest --batch-size that fits on one GPU. "Fits" means the
predicted reserved memory (the caching allocator's segments, a lower bound; see
`fastrlhf.planner.counter`) plus `CONTEXT_RESERVE_GIB` for the CUDA context and library workspaces
is at most the GPU memory. When nothing fits even at batch size 1, it says what would: an FSDP
degree, checkpointing, LoRA.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from fastrlhf.planner.counter import STATIC_CATEGORIES
from fastrlhf.planner.simulate import Prediction, simulate
from fastrlhf.planner.steps import StepSpec, describe

GIB = 2**30
CONTEXT_RESERVE_GIB = 1.0
DEFAULT_GPU_GIB = 80.0
MAX_BATCH = 512  # the batch-size search stops here (shown as 512+)
SEARCH_SIMULATIONS = 1  # extra simulations per checkpointing mode for the largest batch size


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def size(n: float) -> str:
    """Bytes as GiB (MiB / KiB for small numbers)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale or unit == "KiB":
            return f"{n / scale:.{2 if n < 10 * scale else 1}f} {unit}"
    return f"{n} B"


@dataclass
class ModePlan:
    """One checkpointing setting: the prediction and what fits."""

    checkpointing: bool
    prediction: Prediction
    fits: bool
    max_batch: int | None = None        # largest --batch-size that fits on one GPU (0: none)
    max_batch_verified: bool = False    # simulated at that size (else from the linear model)
    fsdp: dict[int, int] = field(default_factory=dict)  # GPUs -> peak bytes per GPU
    at_batch_one: Prediction | None = None


@dataclass
class Plan:
    spec: StepSpec
    model: str
    parameters: int
    n_layers: int
    gpu_memory_gib: float
    gpu_source: str
    modes: list[ModePlan]
    seconds: float = 0.0
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def capacity_bytes(gpu_memory_gib: float) -> float:
    return (gpu_memory_gib - CONTEXT_RESERVE_GIB) * GIB


def _needed(prediction: Prediction) -> int:
    return prediction.reserved_bytes


def _static_and_rest(snap) -> tuple[int, int]:
    """(parameters + gradients + optimizer state, everything else) of a region, the latter
    including the allocator's segment rounding."""
    cats = snap.by(0)
    static = sum(cats.get(c, 0) for c in STATIC_CATEGORIES)
    return static, max(snap.reserved, snap.total) - static


def _linear_max_batch(p0: Prediction, p1: Prediction | None, capacity: float) -> int:
    """Largest batch size whose every region stays under `capacity`, each region's bytes modelled
    as linear in the batch size: through (b0, p0) and (b1, p1), or, when only p0 is known,
    parameters / gradients / optimizer state fixed and everything else proportional to the batch."""
    b0 = p0.spec.batch_size
    best = MAX_BATCH
    for key, snap0 in p0.regions.items():
        total0 = max(snap0.reserved, snap0.total)
        if p1 is not None and key in p1.regions and p1.spec.batch_size != b0:
            snap1 = p1.regions[key]
            slope = (max(snap1.reserved, snap1.total) - total0) / (p1.spec.batch_size - b0)
            intercept = total0 - slope * b0
        else:
            static, rest = _static_and_rest(snap0)
            slope, intercept = rest / b0, static
        if intercept > capacity:
            return 0
        if slope > 0:
            best = min(best, int((capacity - intercept) // slope))
    return max(best, 0)


def _search_max_batch(spec: StepSpec, p0: Prediction, capacity: float, simulate_fn) -> tuple[int, bool, dict]:
    """(largest batch size that fits on one GPU, whether a simulation at that size confirmed it,
    {batch size: prediction} of the simulations made). Starts from the linear model around the
    given batch size and re-simulates at its answer at most SEARCH_SIMULATIONS times."""
    known = {spec.batch_size: p0}
    guess = _linear_max_batch(p0, None, capacity)
    for _ in range(SEARCH_SIMULATIONS):
        guess = max(guess, 1)
        if guess in known:
            break
        known[guess] = simulate_fn(replace(spec, batch_size=guess))
        nearest = min((p for b, p in known.items() if b != guess), key=lambda p: abs(p.spec.batch_size - guess))
        guess = _linear_max_batch(known[guess], nearest, capacity)
    best_simulated = max((b for b, p in known.items() if _needed(p) <= capacity), default=0)
    if best_simulated == 0 and guess == 0 and 1 not in known:  # "nothing fits" is said after simulating batch size 1
        known[1] = simulate_fn(replace(spec, batch_size=1))
        best_simulated = 1 if _needed(known[1]) <= capacity else 0
    if guess > best_simulated and guess not in known:
        return guess, False, known
    return best_simulated, True, known


def _feasible_for_search(spec: StepSpec) -> bool:
    return spec.stage not in ("ppo", "grpo") or spec.grad_accum_steps * spec.num_minibatches == 1


def make_plan(spec: StepSpec, config, model: str, *, gpu_memory_gib: float = DEFAULT_GPU_GIB,
              gpu_source: str = "default", fsdp_gpus: tuple[int, ...] = (2, 4, 8), search: bool = True,
              drop_reference_parameters: bool = False) -> Plan:
    """Simulate `spec` with checkpointing off and on, and answer what fits (module docstring)."""
    from fastrlhf.planner.configs import parameter_count

    if not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib must be > 0, got {gpu_memory_gib}")
    started = time.perf_counter()
    capacity = capacity_bytes(gpu_memory_gib)
    notes: list[str] = []

    def run(s: StepSpec) -> Prediction:
        prediction = simulate(s, config, model_name=model)
        if drop_reference_parameters:
            _drop_reference_parameters(prediction)
        return prediction

    modes = []
    for checkpointing in (False, True):
        mode_spec = replace(spec, checkpointing=checkpointing)
        prediction = run(mode_spec)
        notes += [n for n in prediction.notes if n not in notes]
        mode = ModePlan(checkpointing, prediction, fits=_needed(prediction) <= capacity,
                        fsdp={n: prediction.fsdp_peak_bytes(n) for n in fsdp_gpus})
        if search and _feasible_for_search(mode_spec):
            mode.max_batch, mode.max_batch_verified, known = _search_max_batch(mode_spec, prediction, capacity, run)
            mode.at_batch_one = known.get(1)
        modes.append(mode)
    plan = Plan(spec, model, parameter_count(config), config.num_hidden_layers, gpu_memory_gib, gpu_source, modes,
                notes=notes)
    plan.suggestions = _suggestions(plan, capacity, config, run)
    plan.seconds = time.perf_counter() - started
    return plan


def _drop_reference_parameters(prediction: Prediction) -> None:
    """--reference-device cpu: the reference copy's weights are not on the GPU."""
    for snap in prediction.regions.values():
        for key in [k for k in snap.parts if k[0] == "parameters" and k[1] == "reference"]:
            value = snap.parts.pop(key)
            snap.total -= value
            snap.reserved = max(0, snap.reserved - value)


def _suggestions(plan: Plan, capacity: float, config, run) -> list[str]:
    """What would fit when the configuration as given does not."""
    out = []
    if any(m.fits for m in plan.modes):
        if not plan.modes[0].fits:
            out.append("it fits only with activation checkpointing")
        return out
    out.append(f"does not fit on one {plan.gpu_memory_gib:g} GiB GPU at --batch-size {plan.spec.batch_size}"
               + (" with or without activation checkpointing" if len(plan.modes) > 1 else ""))
    if any(m.max_batch for m in plan.modes):
        best = max(plan.modes, key=lambda m: m.max_batch or 0)
        out.append(f"--batch-size {best.max_batch} fits{' with activation checkpointing' if best.checkpointing else ''}"
                   + ("" if best.max_batch_verified else " (estimated)"))
        return out
    searched = [m for m in plan.modes if m.max_batch is not None]
    if searched:
        out.append("nothing fits on one GPU even at --batch-size 1")
    for mode in plan.modes:
        base = mode.at_batch_one or mode.prediction
        for gpus in (2, 4, 8, 16, 32, 64):
            if base.fsdp_peak_bytes(gpus) + (base.reserved_bytes - base.peak_bytes) <= capacity:
                at = f"--batch-size {base.spec.batch_size}"
                out.append(f"FSDP over {gpus} GPUs (--fsdp, torchrun) fits at {at}"
                           f"{' with activation checkpointing' if mode.checkpointing else ' without checkpointing'}:"
                           f" {size(base.fsdp_peak_bytes(gpus))} per GPU")
                break
        else:
            out.append(f"not even FSDP over 64 GPUs fits at --batch-size {base.spec.batch_size}"
                       f"{' with' if mode.checkpointing else ' without'} checkpointing")
    if plan.spec.setup == "full":
        lora = run(replace(plan.spec, setup="shared-lora", checkpointing=True, batch_size=1))
        verdict = "fits" if _needed(lora) <= capacity else "does not fit either"
        out.append(f"LoRA roles (without --no-lora) with checkpointing at --batch-size 1: {size(_needed(lora))}, {verdict}")
    return out


# ---------------------------------------------------------------------------- text


def _parameters_text(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def format_plan(plan: Plan) -> str:
    spec = plan.spec
    setup = {"shared-lora": f"LoRA roles on one shared base (r={spec.lora_r})",
             "full": "full fine-tuning (--no-lora: reference copy, value head on the policy trunk)",
             "separate": "TRL-style separate full models", "trl-peft": "TRL + peft"}[spec.setup]
    first = plan.modes[0].prediction
    off, on = plan.modes
    lines = [
        f"fastrlhf memory plan: {spec.stage} on {plan.model} ({_parameters_text(plan.parameters)} parameters, "
        f"{plan.n_layers} layers), {setup}, {spec.dtype}, AdamW",
        f"  step: {describe(spec)}; micro-batch {spec.micro_rows} rows"
        + (f", gradient accumulation {spec.grad_accum_steps}" if spec.grad_accum_steps > 1 else ""),
        f"  how: the trainer's own step on fake tensors as on an H100/H200 ({first.method}); {plan.seconds:.0f} s",
        "",
    ]
    rows = [("predicted peak per GPU", "no checkpointing", "checkpointing"),
            ("1 GPU, allocated", size(off.prediction.peak_bytes), size(on.prediction.peak_bytes)),
            ("1 GPU, reserved (lower bound)", size(off.prediction.reserved_bytes), size(on.prediction.reserved_bytes))]
    rows += [(f"FSDP over {gpus} GPUs", size(off.fsdp[gpus]), size(on.fsdp[gpus])) for gpus in off.fsdp]
    rows.append((f"fits one {plan.gpu_memory_gib:g} GiB GPU ({plan.gpu_source})",
                 "yes" if off.fits else "no", "yes" if on.fits else "no"))
    if any(m.max_batch is not None for m in plan.modes):
        def batch_text(m):
            if m.max_batch is None:
                return "-"
            text = {0: "none", MAX_BATCH: f"{MAX_BATCH}+"}.get(m.max_batch, str(m.max_batch))
            return text + ("" if m.max_batch_verified else " (est.)")
        rows.append(("largest --batch-size on one GPU", batch_text(off), batch_text(on)))
    width = max(len(r[0]) for r in rows)
    lines += [f"  {a:<{width}}  {b:>16}  {c:>14}" for a, b, c in rows]
    for mode in plan.modes:
        p = mode.prediction
        name, value = p.dominant()
        label = "with checkpointing" if mode.checkpointing else "without checkpointing"
        lines.append("")
        lines.append(f"  {label}: peak in phase '{p.peak_phase}', dominant term: {name} ({size(value)})")
        lines.append("    by category: " + ", ".join(f"{k} {size(v)}" for k, v in _sorted(p.by_category())))
        lines.append("    by role:     " + ", ".join(f"{k} {size(v)}" for k, v in _sorted(p.by_role())))
        lines.append("    phase peaks: " + ", ".join(f"{k} {size(v)}" for k, v in p.phase_peaks_bytes().items()))
    if plan.suggestions:
        lines.append("")
        lines += [f"  -> {s}" for s in plan.suggestions]
    if plan.notes:
        lines.append("")
        lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _sorted(values: dict) -> list:
    """Largest first, leaving out parts under 0.5% of the total."""
    total = sum(values.values()) or 1
    return sorted(((k, v) for k, v in values.items() if v >= total / 200), key=lambda kv: -kv[1])
