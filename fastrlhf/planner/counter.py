"""A dispatch-level counter of live tensor storages, with a per-category, per-role breakdown of the peak.

`MemoryCounter` is a `TorchDispatchMode`: every ATen op's outputs pass through it, and each new
storage is counted until its finaliser runs (a `weakref.finalize` on the storage object, which
PyTorch keeps alive exactly as long as the C++ storage). The same counter works on real tensors
(a CPU run, to check the simulator) and on fake tensors (the simulator, `FakeTensorMode`), so the
two are measured by one rule. Tensors that exist before counting starts (model parameters, buffers)
are registered with `track`.

Each live storage carries a label (category, role, phase it was created in). Categories:

    parameters    weights and buffers of every model (registered with `track`)
    gradients     `.grad` of trainable parameters (relabelled by a post-accumulate-grad hook)
    optimizer     optimizer state (relabelled after the optimizer created it)
    activations   tensors autograd saved for backward (relabelled by a saved-tensors pack hook)
    temporaries   everything else: layer outputs, logits chunks, attention workspaces, inputs

CUDA caching allocator model (`block_bytes=512`): every allocation is rounded up to a multiple of
512 bytes, the allocator's block size, which is what `torch.cuda.memory_allocated` counts (size-0
tensors take no block). What it does NOT model: blocks handed out whole instead of split (a
large-pool block is not split when less than 1 MiB would be left, so an allocation may hold up to
1 MiB more than it asked for), and memory reserved but not allocated. For the latter the report
gives a lower bound of the reserved memory at the peak: allocations of 10 MiB or more rounded to
2 MiB segments, those of 1-10 MiB packed into 20 MiB segments, smaller ones into 2 MiB segments,
with perfect packing and no fragmentation over time (`reserved_lower_bound`).

Layer regions, for extrapolating over the number of decoder layers (see `fastrlhf.planner.simulate`):
`watch_layers` hooks the decoder layers; every op is then attributed to a region key
(phase, traversal, position), where a traversal is one pass through the layer stack (a forward, or
a backward, found from the autograd node being executed, whose sequence number falls in the range
recorded when that layer's forward ran) and position is "outside", "first", "mid" or "last" layer.
The counter keeps the peak of every region with its breakdown.
"""
from __future__ import annotations

import bisect
import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
STATIC_CATEGORIES = ("parameters", "gradients", "optimizer")  # what FSDP shards

CUDA_BLOCK_BYTES = 512
_SMALL_ALLOC = 1 << 20          # allocations up to 1 MiB come from 2 MiB segments
_SMALL_SEGMENT = 2 << 20
_LARGE_ALLOC = 10 << 20         # allocations from 1 to 10 MiB come from 20 MiB segments
_MID_SEGMENT = 20 << 20
_LARGE_ROUND = 2 << 20          # larger ones get their own segment, rounded to 2 MiB

_ACCUMULATE_GRAD_SEQ = 1 << 63  # AccumulateGrad nodes carry UINT64_MAX as sequence number


def allocation_bytes(nbytes: int, block_bytes: int) -> int:
    """Bytes an allocation of `nbytes` takes: rounded up to `block_bytes` (1 = no rounding)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // block_bytes) * block_bytes


def _size_class(nbytes: int) -> int:
    return 0 if nbytes <= _SMALL_ALLOC else (1 if nbytes < _LARGE_ALLOC else 2)


def reserved_lower_bound(small: int, mid: int, large_rounded: int) -> int:
    """Reserved bytes at least needed for live allocations summing to small (<= 1 MiB each),
    mid (1-10 MiB) and large_rounded (>= 10 MiB, each already rounded to 2 MiB)."""
    return (-(-small // _SMALL_SEGMENT) * _SMALL_SEGMENT + -(-mid // _MID_SEGMENT) * _MID_SEGMENT
            + large_rounded)


@dataclass
class Snapshot:
    """Live bytes at one moment: total, {(category, role, phase created): bytes}, reserved bound."""

    total: int = 0
    parts: dict = field(default_factory=dict)
    reserved: int = 0

    def by(self, index: int) -> dict[str, int]:
        """Sum of parts grouped by one element of the key (0 category, 1 role, 2 phase)."""
        out: dict[str, int] = {}
        for key, value in self.parts.items():
            out[key[index]] = out.get(key[index], 0) + value
        return out


class LayerTracker:
    """Which decoder layer (if any) the op being dispatched belongs to; see the module docstring."""

    def __init__(self) -> None:
        self.handles: list = []
        self._starts: list[int] = []      # sequence-number intervals of layer forwards, sorted
        self._intervals: list[tuple[int, int, int, int]] = []  # (start, end, index, n_layers)
        self._forward: list[tuple[int, int, int]] = []  # stack of (index, n_layers, start seq)
        self._backward_position: tuple | None = None
        self._last_node = None
        self.traversals = 0
        self._inside = False

    def watch(self, layers) -> None:
        layers = list(layers)
        n = len(layers)
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre_hook(index, n)))
            self.handles.append(layer.register_forward_hook(self._post_hook()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _pre_hook(self, index: int, n: int):
        def hook(module, args):
            self._forward.append((index, n, torch._C._autograd._get_sequence_nr()))
        return hook

    def _post_hook(self):
        def hook(module, args, output):
            index, n, start = self._forward.pop()
            end = torch._C._autograd._get_sequence_nr()
            if end > start:
                at = bisect.bisect(self._starts, start)
                self._starts.insert(at, start)
                self._intervals.insert(at, (start, end, index, n))
        return hook

    def _layer_of_node(self, node) -> tuple | None:
        seq = node._sequence_nr()
        if seq >= _ACCUMULATE_GRAD_SEQ:
            return self._backward_position  # AccumulateGrad: stays where the backward is
        at = bisect.bisect(self._starts, seq) - 1
        if at >= 0:
            start, end, index, n = self._intervals[at]
            if start <= seq < end:
                return (index, n)
        return None

    def position(self) -> tuple[str, ...]:
        """("outside",) or the layer positions ("first", "mid", "last"; a 1-layer stack is both
        first and last) of the op being dispatched; counts traversals of the stack."""
        layer = None
        if self._forward:
            layer = self._forward[-1][:2]
        else:
            node = torch._C._current_autograd_node()
            if node is not None:
                if node is not self._last_node:
                    self._last_node = node
                    self._backward_position = self._layer_of_node(node)
                layer = self._backward_position
        if layer is None:
            self._inside = False
            return ("outside",)
        if not self._inside:
            self._inside = True
            self.traversals += 1
        index, n = layer
        names = []
        if index == 0:
            names.append("first")
        if index == n - 1:
            names.append("last")
        return tuple(names) or ("mid",)


class MemoryCounter(TorchDispatchMode):
    """Counts live storages created by ops dispatched while it is active.

    block_bytes: allocation rounding (512 = CUDA caching allocator blocks, 1 = exact bytes).
    scalar_answers: when True (fake tensors), a data-dependent scalar read (`.item()`, `bool()`)
        answers False / 0 / 1.0 (see `_neutral_scalar`) instead of raising: value checks such as `if bad.any(): raise` or a
        non-finite guard then take their "all is well" branch, as they would in a healthy run.
    """

    def __init__(self, *, block_bytes: int = 1, scalar_answers: bool = False) -> None:
        super().__init__()
        self.block_bytes = block_bytes
        self.scalar_answers = scalar_answers
        self._live: dict[int, list] = {}   # id(storage) -> [bytes, category, role, phase, size class]
        self._parts: dict[tuple[str, str, str], int] = {}
        self._classes = [0, 0, 0]          # small, mid, large (rounded to 2 MiB) live bytes
        self.total = 0
        self.role = "other"
        self.phase = "setup"
        self.peak = Snapshot()
        self.phase_peaks: dict[str, Snapshot] = {}
        self.region_peaks: dict[tuple, Snapshot] = {}
        self.layers = LayerTracker()
        self._finalizers: dict[int, weakref.finalize] = {}
        self._role_intervals: list[tuple[int, int, str]] = []
        self._backward_role = "other"

    # ------------------------------------------------------------------ labels
    @contextlib.contextmanager
    def label(self, *, role: str | None = None, phase: str | None = None):
        """New storages created inside are attributed to `role` / `phase`; so are those created
        later by the backward of the autograd nodes recorded inside (found by sequence number)."""
        previous = self.role, self.phase
        self.role = role if role is not None else self.role
        self.phase = phase if phase is not None else self.phase
        start = torch._C._autograd._get_sequence_nr()
        try:
            yield
        finally:
            end = torch._C._autograd._get_sequence_nr()
            if role is not None and end > start:
                self._role_intervals.append((start, end, role))
            self.role, self.phase = previous

    def _role_now(self) -> str:
        """The label's role, or in a backward the role whose forward recorded the running node."""
        node = torch._C._current_autograd_node()
        if node is None:
            return self.role
        seq = node._sequence_nr()
        if seq >= _ACCUMULATE_GRAD_SEQ:
            return self._backward_role
        role = self.role
        for start, end, interval_role in reversed(self._role_intervals):  # innermost label wins
            if start <= seq < end:
                role = interval_role
                break
        self._backward_role = role
        return role

    def reset_peaks(self, phase: str = "step setup") -> None:
        """Forget the peaks (live storages stay counted): measure from here on, in `phase`."""
        self.phase = phase
        self.peak = Snapshot()
        self.phase_peaks = {}
        self.region_peaks = {}
        self.layers.traversals = 0

    # ------------------------------------------------------------------ tracking
    def track(self, tensor: torch.Tensor, category: str, role: str | None = None) -> None:
        """Count `tensor`'s storage (if not counted yet) and label it `category`."""
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        storage = self._storage(tensor)
        if storage is None:
            return
        key = id(storage)
        if key not in self._live:
            self._add(storage, key, category, role or self.role)
        else:
            self.relabel(tensor, category, role)

    def relabel(self, tensor: torch.Tensor, category: str, role: str | None = None) -> None:
        """Move an already counted storage to `category` (and `role`)."""
        storage = self._storage(tensor)
        entry = self._live.get(id(storage)) if storage is not None else None
        if entry is None:
            return
        nbytes, old_cat, old_role, phase, _ = entry
        self._bump((old_cat, old_role, phase), -nbytes)
        entry[1], entry[2] = category, role or old_role
        self._bump((entry[1], entry[2], phase), nbytes)

    def relabel_category(self, old: str, new: str) -> None:
        """Move every live storage of category `old` to `new` (e.g. what a warm-up step left)."""
        for entry in self._live.values():
            if entry[1] == old:
                self._bump((old, entry[2], entry[3]), -entry[0])
                entry[1] = new
                self._bump((new, entry[2], entry[3]), entry[0])

    def category_of(self, tensor: torch.Tensor) -> str | None:
        storage = self._storage(tensor)
        entry = self._live.get(id(storage)) if storage is not None else None
        return None if entry is None else entry[1]

    @staticmethod
    def _storage(tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return None
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None

    def _bump(self, key, delta: int) -> None:
        value = self._parts.get(key, 0) + delta
        if value:
            self._parts[key] = value
        else:
            self._parts.pop(key, None)

    def current_phase(self) -> str:
        """The phase label, or "backward" while autograd runs a backward node."""
        return "backward" if torch._C._current_autograd_node() is not None else self.phase

    def _add(self, storage, key: int, category: str, role: str) -> None:
        nbytes = allocation_bytes(storage.nbytes(), self.block_bytes)
        size_class = _size_class(nbytes)
        phase = self.current_phase()
        self._live[key] = [nbytes, category, role, phase, size_class]
        self._bump((category, role, phase), nbytes)
        self._classes[size_class] += -(-nbytes // _LARGE_ROUND) * _LARGE_ROUND if size_class == 2 else nbytes
        self.total += nbytes
        self._finalizers[key] = weakref.finalize(storage, self._free, key)
        if nbytes:
            self._record(phase)

    def _free(self, key: int) -> None:
        self._finalizers.pop(key, None)
        entry = self._live.pop(key, None)
        if entry is None:
            return
        nbytes, category, role, phase, size_class = entry
        self._bump((category, role, phase), -nbytes)
        self._classes[size_class] -= -(-nbytes // _LARGE_ROUND) * _LARGE_ROUND if size_class == 2 else nbytes
        self.total -= nbytes

    def _snapshot(self) -> Snapshot:
        return Snapshot(self.total, dict(self._parts), reserved_lower_bound(*self._classes))

    def _record(self, phase: str) -> None:
        total = self.total
        positions = self.layers.position()
        snap = None
        if total > self.peak.total:
            snap = self._snapshot()
            self.peak = snap
        phase_peak = self.phase_peaks.get(phase)
        if phase_peak is None or total > phase_peak.total:
            snap = snap or self._snapshot()
            self.phase_peaks[phase] = snap
        for position in positions:
            region = (phase, self.layers.traversals, position)
            region_peak = self.region_peaks.get(region)
            if region_peak is None or total > region_peak.total:
                snap = snap or self._snapshot()
                self.region_peaks[region] = snap

    def live_snapshot(self) -> Snapshot:
        """The live bytes now (not a peak)."""
        return self._snapshot()

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.scalar_answers and func is torch.ops.aten._local_scalar_dense.default:
            return _neutral_scalar(args[0])
        try:
            out = func(*args, **(kwargs or {}))
        except ValueError as error:
            # a fake tensor's impossible view raises ValueError where eager raises RuntimeError
            # (which code catches to fall back to a copy, e.g. fastrlhf's rows_view)
            if func.overloadpacket is torch.ops.aten.view:
                raise RuntimeError(str(error)) from error
            raise
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                storage = self._storage(leaf)
                if storage is not None and id(storage) not in self._live:
                    self._add(storage, id(storage), "temporaries", self._role_now())
        return out

    # ------------------------------------------------------------------ hooks
    def watch_gradients(self, params, role_of=None) -> list:
        """Relabel the gradient of each parameter as "gradients" once autograd accumulated it."""
        handles = []
        for p in params:
            role = role_of(p) if role_of else None

            def hook(param, role=role):
                if param.grad is not None:
                    self.relabel(param.grad, "gradients", role)
            handles.append(p.register_post_accumulate_grad_hook(hook))
        return handles

    def saved_tensors_hooks(self):
        """Context: tensors autograd saves for backward are relabelled "activations"."""

        def pack(tensor):
            if self.category_of(tensor) == "temporaries":
                self.relabel(tensor, "activations")
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def close(self) -> None:
        """Detach every finaliser and hook (the counter's numbers stay readable)."""
        for fin in self._finalizers.values():
            fin.detach()
        self._finalizers = {}
        self.layers.remove()


def _neutral_scalar(tensor: torch.Tensor):
    """The answer of a data-dependent read of a fake tensor: False for a flag (no NaN found, no bad
    target), 0 for an integer (a count of bad values), 1.0 for a float (a step count, a norm: a
    value code may divide by)."""
    if tensor.dtype == torch.bool:
        return False
    if tensor.is_floating_point():
        return 1.0
    return 0
