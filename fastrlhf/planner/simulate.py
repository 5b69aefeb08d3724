"""Predicted peak memory of one training step: the real step run on fake tensors, few layers, extrapolated.

    from fastrlhf.planner import simulate, StepSpec, load_config
    config, name = load_config("Qwen2.5-7B")
    prediction = simulate(StepSpec("ppo", batch_size=8, seq_len=2048, prompt_len=1024, checkpointing=True), config)
    prediction.peak_bytes, prediction.by_category(), prediction.phase_peaks_bytes(), prediction.fsdp_peak_bytes(8)

Why few layers: simulation time follows the number of ops (a shared-roles PPO step of a 24-layer
model runs for minutes on fake tensors), not tensor sizes. Decoder layers are identical, so the
step is simulated with 2 and 3 layers (`layers`) and the peak extrapolated linearly in the number
of layers, region by region: the counter keeps the peak of each (phase, traversal of the layer
stack, position) region, position being outside the layers or in the first / last layer of a
traversal. Inside a traversal the live bytes at the same op of layer j are
    G + j * A_done + (L - 1 - j) * A_todo + A_op,
linear in j (so a middle layer never beats both ends) and, at the first or last layer, linear in
the layer count L; outside the layers they are G + L * A. Each region's peak (and its breakdown by
category / role / phase) is extrapolated from the two runs and the step's peak is the largest
extrapolated region. Exact when the layers are identical and the same op is the peak of its region
at every L (tests check it against a direct 3-layer run and against real runs); models whose layers
differ (alternating sliding-window / global attention) get the first layer's shape for all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastrlhf.planner.counter import STATIC_CATEGORIES, Snapshot
from fastrlhf.planner.steps import StepResult, StepSpec, run_step

DEFAULT_LAYERS = (2, 3)


def _combine(a: Snapshot, b: Snapshot, wa: float, wb: float) -> Snapshot:
    parts = {}
    for key in set(a.parts) | set(b.parts):
        value = wa * a.parts.get(key, 0) + wb * b.parts.get(key, 0)
        if value > 0.5:
            parts[key] = int(round(value))
    return Snapshot(total=sum(parts.values()), parts=parts, reserved=max(0, int(round(wa * a.reserved + wb * b.reserved))))


def extrapolate(small: StepResult, large: StepResult, n_layers: int) -> tuple[dict, list[str]]:
    """{region: Snapshot at n_layers} from two runs with fewer layers; notes on regions one run lacks."""
    l1, l2 = small.n_layers, large.n_layers
    w2 = (n_layers - l1) / (l2 - l1)
    w1 = 1.0 - w2
    regions, notes = {}, []
    keys = set(small.region_peaks) | set(large.region_peaks)
    biggest = max([s.total for s in large.region_peaks.values()] or [1])
    for key in keys:
        if key[2] == "mid":
            continue
        a, b = small.region_peaks.get(key), large.region_peaks.get(key)
        if a is None or b is None:
            present = a or b
            if present.total > 0.01 * biggest:
                notes.append(f"region {key} ran with {l1 if a else l2} layers only ({present.total / 2**30:.2f} GiB): "
                             "left out of the extrapolation")
            continue
        regions[key] = _combine(a, b, w1, w2)
    return regions, notes


@dataclass
class Prediction:
    """The predicted peak of one step and its breakdown (bytes; CUDA allocator blocks when target="cuda")."""

    spec: StepSpec
    model: str
    n_layers: int
    target: str
    regions: dict = field(default_factory=dict)      # (phase, traversal, position) -> Snapshot
    static: dict = field(default_factory=dict)       # category -> bytes held before the step
    seconds: float = 0.0
    method: str = ""
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> Snapshot:
        return max(self.regions.values(), key=lambda s: s.total) if self.regions else Snapshot()

    @property
    def peak_bytes(self) -> int:
        return self.peak.total

    @property
    def reserved_bytes(self) -> int:
        """Lower bound of the caching allocator's reserved memory at the peak."""
        return max(self.peak.reserved, self.peak.total)

    @property
    def peak_phase(self) -> str:
        key = max(self.regions, key=lambda k: self.regions[k].total)
        return key[0]

    def by_category(self) -> dict[str, int]:
        return self.peak.by(0)

    def by_role(self) -> dict[str, int]:
        return self.peak.by(1)

    def by_phase_created(self) -> dict[str, int]:
        return self.peak.by(2)

    def phase_peaks(self) -> dict[str, Snapshot]:
        out: dict[str, Snapshot] = {}
        for (phase, _, _), snap in self.regions.items():
            if phase not in out or snap.total > out[phase].total:
                out[phase] = snap
        return out

    def phase_peaks_bytes(self) -> dict[str, int]:
        return {phase: snap.total for phase, snap in self.phase_peaks().items()}

    def dominant(self) -> tuple[str, int]:
        """(category, bytes) of the largest term at the peak."""
        cats = self.by_category()
        name = max(cats, key=cats.get)
        return name, cats[name]

    def _sharded(self, key: tuple[str, str, str]) -> bool:
        """Whether FSDP shards the bytes of a (category, role, phase created) part: parameters,
        gradients, optimizer state, and the optimizer step's temporaries (AdamW works on the local
        shards). The frozen reference copy of fastrlhf's full fine-tuning is sharded too
        (`RoleModel.shard_reference_copy`), unless it is kept on the CPU (`reference_device`), where
        it stays whole."""
        category, role, phase = key
        if category == "parameters" and role == "reference" and self.spec.setup == "full":
            return self.spec.reference_device in (None, "cuda")
        return category in STATIC_CATEGORIES or (category == "temporaries" and phase == "optimizer step")

    def fsdp_peak_bytes(self, gpus: int) -> int:
        """Peak per GPU with FSDP over `gpus` GPUs: the sharded parts (`_sharded`) divided, the
        activations and other temporaries not; taken over every region (the peak may move).
        FSDP's own all-gather buffers (about two layers of weights, plus the embeddings and LM head
        of the root whose forward runs) are not counted."""
        if gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {gpus}")
        best = 0
        for snap in self.regions.values():
            sharded = sum(v for k, v in snap.parts.items() if self._sharded(k))
            best = max(best, snap.total - sharded + -(-sharded // gpus))
        return best


def simulate(spec: StepSpec, config, *, model_name: str = "model", target: str = "cuda",
             layers: tuple[int, int] = DEFAULT_LAYERS) -> Prediction:
    """Predict the peak of one step of `spec` on the model of `config` (see the module docstring).

    Runs the step directly when the model has at most max(layers) decoder layers."""
    started = time.perf_counter()
    n = config.num_hidden_layers
    l1, l2 = layers
    if not 1 <= l1 < l2:
        raise ValueError(f"layers must be two increasing layer counts >= 1, got {layers}")
    if n <= l2:
        result = run_step(spec, config, fake=True, target=target)
        prediction = Prediction(spec, model_name, n, target, regions=dict(result.region_peaks),
                                static=dict(result.static_bytes), method=f"direct ({n} layers)",
                                notes=list(result.notes))
    else:
        small = run_step(spec, config, n_layers=l1, fake=True, target=target)
        large = run_step(spec, config, n_layers=l2, fake=True, target=target)
        regions, notes = extrapolate(small, large, n)
        w2 = (n - l1) / (l2 - l1)
        static = {k: int(round((1 - w2) * small.static_bytes.get(k, 0) + w2 * large.static_bytes.get(k, 0)))
                  for k in set(small.static_bytes) | set(large.static_bytes)}
        prediction = Prediction(spec, model_name, n, target, regions=regions, static=static,
                                method=f"{l1} and {l2} layers simulated, extrapolated to {n}",
                                notes=list(dict.fromkeys(small.notes + large.notes)) + notes)
    prediction.seconds = time.perf_counter() - started
    return prediction
