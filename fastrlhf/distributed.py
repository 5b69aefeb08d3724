"""Running the trainers under `torchrun` / `accelerate launch`: one small context object.

`DistContext.from_env()` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
...) and initialises `torch.distributed` when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU). With one
process every method is a cheap no-op, so the trainers have a single code path.

Why gradients are averaged by hand (`sync_gradients`) instead of wrapping the model in
`DistributedDataParallel`: DDP only prepares its gradient reducer inside `DDP.forward`, but a
`RoleModel` is called through several other methods (`hidden_states`, `values`, `rewards`,
`token_logprobs`) that bypass it, so DDP would either miss gradients or fail with "expected to mark a
variable ready only once". Averaging the trainable gradients in a few flat buckets after `backward()`
gives exactly DDP's result (mean over ranks) with one collective per bucket, and is independent of how
the model is called. FSDP2 (`apply_fsdp`) reduces its own sharded gradients; `sync_gradients` then
only averages the parameters FSDP does not manage.

A failing rank brings the job down instead of hanging: the process group gets a finite timeout
(`timeout_minutes`, env FASTRLHF_DIST_TIMEOUT_MINUTES, default 30), and torchrun's elastic agent
(default `--max-restarts 0`) tears down every other rank as soon as one exits non-zero and exits
non-zero itself, printing the failed rank's traceback.

Teardown: `close()` must be the last thing every rank does, after everything `apply_fsdp` sharded
(model, optimizer, trainer) has been dropped. Only destroying the group's last reference joins its
gloo worker threads, and a worker still releasing a finished collective's tensors when Python
starts shutting down needs the GIL, which kills the thread inside a noexcept destructor: SIGABRT,
"terminate called without an active exception", now and then, more often on a loaded machine
(torch 2.13, Python 3.11; see `close`).
"""
from __future__ import annotations

import datetime
import gc
import importlib
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from fastrlhf._checks import check_whiten_args
from fastrlhf.losses.advantages import whiten
from fastrlhf.twins import advantages as twin_advantages

T = TypeVar("T")

DEFAULT_TIMEOUT_MINUTES = 30.0
_BUCKET_BYTES = 64 * 1024 * 1024  # bounded extra memory for the flat all-reduce buffers


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


@dataclass
class DistContext:
    """Where this process sits in the job. Build it with `DistContext.from_env()`.

    Attributes: rank, world_size, local_rank, device (torch.device this rank computes on),
    backend ("nccl" / "gloo" / None for one process), fsdp (True after `apply_fsdp`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    fsdp: bool = False
    _owns_group: bool = False
    _fsdp_params: set = field(default_factory=set, repr=False)
    _meshes: list = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_env(
        cls,
        *,
        backend: str | None = None,
        device: str | torch.device | None = None,
        timeout_minutes: float | None = None,
    ) -> "DistContext":
        """Read torchrun's environment; initialise the process group when WORLD_SIZE > 1.

        backend: None picks nccl when CUDA is available (and `device` is not CPU), else gloo.
        device: None picks `cuda:LOCAL_RANK` when CUDA is available, else CPU.
        timeout_minutes: collective timeout (None: env FASTRLHF_DIST_TIMEOUT_MINUTES or 30). A rank
        stuck waiting for a dead peer raises after this long instead of hanging forever.
        """
        world_size = _env_int("WORLD_SIZE", 1)
        _env_int("RANK", 0)  # checked here (a clear error); init_process_group reads it itself
        local_rank = _env_int("LOCAL_RANK", 0)
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world_size <= 1:
            return cls(device=device)
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        owns = False
        if not dist.is_initialized():
            if timeout_minutes is None:
                timeout_minutes = float(
                    os.environ.get("FASTRLHF_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES)
                )
            if not (timeout_minutes > 0):
                raise ValueError(f"timeout_minutes must be > 0, got {timeout_minutes}")
            # torch.distributed.nn.functional evaluates `group=group.WORLD` defaults at import time;
            # imported after init (torch.distributed._shard imports it lazily during training) its
            # functions would pin the default group forever and `close()` could never free it.
            importlib.import_module("torch.distributed.nn.functional")

            dist.init_process_group(
                backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
            )
            owns = True
        else:  # e.g. `accelerate launch` already initialised it
            backend = dist.get_backend()
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            device=device,
            backend=backend,
            _owns_group=owns,
        )

    @property
    def is_main(self) -> bool:
        """True on rank 0: the only rank that logs, writes metrics and saves checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it (safe to call twice).

        Call it on every rank as the last step, after dropping the objects `apply_fsdp` sharded
        (the model, its optimizer, the trainer): FSDP state holds the group, and
        `destroy_process_group` only unregisters it. A gloo group that is still alive keeps its
        worker threads, and a worker that has finished a collective but not yet released its
        tensors (preempted in between, which a busy machine makes likely) takes the GIL to do so;
        during interpreter shutdown that kills the thread inside a noexcept destructor and the
        process aborts with "terminate called without an active exception". Freeing the last
        reference here joins the workers while Python is still fully alive. Warns
        (RuntimeWarning) when something still holds the group after this call.
        """
        if self._owns_group and dist.is_initialized():
            group = weakref.ref(dist.group.WORLD)
            dist.destroy_process_group()
            # DTensor's global sharding/redistribution caches keep every DeviceMesh alive for the
            # rest of the process, and a torch 2.13 mesh holds its groups in `_pg_registry`: cut
            # that link (the groups are destroyed, the mesh is unusable from here on anyway).
            for mesh in self._meshes:
                registry = getattr(mesh, "_pg_registry", None)
                if isinstance(registry, dict):
                    registry.clear()
            self._meshes.clear()
            gc.collect()  # FSDP-sharded modules sit in reference cycles (hooks): free them now, not at exit
            if group() is not None:
                warnings.warn(
                    "DistContext.close: the process group is still referenced (an FSDP-sharded model, its "
                    "optimizer or a DTensor is still alive), so it outlives close() (with gloo, its worker "
                    "threads too) and the process can abort at exit; drop those objects before close()",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._owns_group = False

    # ------------------------------------------------------------------ data
    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's slice of `items` (already in the global order): items[rank::world_size].

        Like `DistributedSampler`, the list is first padded by repeating items from its start so
        that every rank gets exactly ceil(len / world_size) items, hence the same number of batches:
        a rank that ran out of data early would leave the others waiting in a collective forever.
        """
        items = list(items)
        if self.world_size == 1:
            return items
        if not items:
            raise ValueError("shard: got an empty list of items; every rank needs data")
        per_rank = math.ceil(len(items) / self.world_size)
        total = per_rank * self.world_size
        padded = items + [items[i % len(items)] for i in range(total - len(items))]
        return padded[self.rank :: self.world_size]

    def shard_epoch(self, items: Sequence[T], *, seed: int, epoch: int, shuffle: bool = True) -> list[T]:
        """The global order for `epoch` (a seeded permutation, identical on every rank), sharded."""
        return self.shard(epoch_order(items, seed=seed, epoch=epoch, shuffle=shuffle))

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place and return it (identity with one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """Rank `src`'s Python object on every rank (e.g. a checkpoint path chosen by rank 0)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: object) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def reduce_metrics(self, metrics: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Mean of each scalar metric over ranks (one collective for the whole dict).

        Values may be floats/ints or scalar tensors (DTensors are materialised); the result holds detached fp32 scalar tensors on
        this rank's device (the caller decides when to sync them to the host). Every rank must pass
        the same keys.
        """
        keys = sorted(metrics)
        if not keys:
            return {}
        values = [
            _materialize(v).detach().float().reshape(()).to(self.device)
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), device=self.device)
            for v in (metrics[k] for k in keys)
        ]
        stacked = torch.stack(values)
        if self.distributed:
            # gloo has no AVG; nccl does but SUM / world keeps one code path.
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
            stacked = stacked / self.world_size
        return dict(zip(keys, stacked.unbind(0)))

    # ------------------------------------------------------------------ gradients
    def sync_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """DDP semantics: replace each trainable gradient by its mean over ranks.

        Call after `backward()` (after the last micro-batch of a gradient-accumulation window) and
        before clipping / the optimizer step, on every rank with the same parameter list.
        A gradient that is None on some ranks counts as zeros there; a parameter whose gradient is
        None on every rank keeps None (so the optimizer skips it exactly as in a single process).
        Parameters managed by FSDP (`apply_fsdp`) are skipped: FSDP already reduce-scattered them.
        """
        if not self.distributed:
            return
        params = [p for p in params if p.requires_grad and id(p) not in self._fsdp_params]
        if not params:
            return
        # 1) which parameters have a gradient on at least one rank (tiny collective; keeps the
        #    bucket layout identical on every rank, so no rank waits for a differently sized buffer)
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        self.all_reduce_max(has_grad)
        present = [p for p, flag in zip(params, has_grad.tolist()) if flag]
        # 2) flat buckets per (device, dtype), each all-reduced once
        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in present:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
        for group in groups.values():
            for bucket in _buckets(group, _BUCKET_BYTES):
                grads = [p.grad for p in bucket]
                flat = torch._utils._flatten_dense_tensors(grads)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat.div_(self.world_size)
                for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(synced)

    # ------------------------------------------------------------------ FSDP2
    def apply_fsdp(
        self,
        module: torch.nn.Module,
        *,
        forward_methods: Sequence[str] = (),
        mixed_precision: torch.dtype | None = None,
        reshard_after_forward: bool = True,
        reshard_root_after_forward: bool = False,
    ) -> torch.nn.Module:
        """Shard `module` with FSDP2 (`fully_shard`): each decoder layer, then `module` as the root.

        Decoder layers are found as the entries of every `nn.ModuleList` named `layers` / `h` /
        `blocks` (Llama, Mistral, Qwen, GPT-2, ...). `forward_methods` names extra methods of the
        root that run a forward pass (e.g. "hidden_states", "values", "rewards", "generate"): FSDP2
        only gathers parameters around `forward()`, so these are registered with
        `register_fsdp_forward_method`. `mixed_precision` (e.g. torch.bfloat16) sets the parameter
        dtype for compute; gradients are reduced in fp32. `reshard_root_after_forward`: free the root's
        own gathered parameters after each forward too (a frozen module that never runs backward,
        e.g. the reference copy); by default they stay gathered until the backward. No-op with one
        process. May be called once per root module (the model, then the reference copy).
        """
        if not self.distributed:
            return module
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        names_before = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        self._meshes.append(mesh)  # close() cuts its link to the group
        kwargs: dict = {"mesh": mesh}
        if mixed_precision is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        for layer in decoder_layers(module):
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
        fully_shard(module, reshard_after_forward=reshard_root_after_forward, **kwargs)
        for name in forward_methods:
            if hasattr(module, name):
                register_fsdp_forward_method(module, name)
        # HF `generate` turns on synced_gpus (keep stepping until EVERY rank is done) only for modules
        # it recognises as FSDP-managed. Without it a rank whose samples all hit EOS early stops
        # calling the layers' all-gathers and the other ranks hang (PPO/GRPO rollouts under --fsdp).
        for sub in module.modules():
            sub._is_fsdp_managed_module = True
        # fully_shard swaps every nn.Parameter for a new DTensor Parameter: references cached before
        # (e.g. RoleModel's per-role adapter lists) would point at tensors that never get gradients.
        after = dict(module.named_parameters(remove_duplicate=False))
        _rebind_cached_parameters(module, {old: after[name] for old, name in names_before.items() if name in after})
        self.fsdp = True
        self._fsdp_params |= {id(p) for p in module.parameters()}  # one call per root module
        return module


def full_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every FSDP-sharded DTensor gathered into a full CPU tensor (others moved to CPU).

    A collective when DTensors are present: call it on EVERY rank with the same keys, then save from
    rank 0. Plain tensors are returned detached, on CPU.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        value = value.detach()
        if hasattr(value, "full_tensor"):  # DTensor
            value = value.full_tensor()
        out[name] = value.to("cpu")
    return out


def load_full_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy full tensors `state` (names as in `module.named_parameters()` / buffers) into `module`,
    re-sharding into FSDP DTensor parameters where needed. Missing names are left unchanged;
    unknown names raise KeyError. Needs no communication (every rank holds the full tensors)."""
    targets = dict(module.named_parameters())
    targets.update(dict(module.named_buffers()))
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise KeyError(f"load_full_state_dict: names not in the module: {unknown[:5]}")
    with torch.no_grad():
        for name, full in state.items():
            target = targets[name]
            if hasattr(target, "device_mesh"):  # DTensor: take this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                shard = distribute_tensor(
                    full.to(target.device_mesh.device_type), target.device_mesh, target.placements,
                    src_data_rank=None,
                )
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(full.to(device=target.device, dtype=target.dtype))


def epoch_order(items: Sequence[T], *, seed: int, epoch: int, shuffle: bool = True) -> list[T]:
    """The global order of `items` in `epoch`: a permutation seeded by (seed, epoch), so it is the
    same on every rank and reproducible after a resume without saving the order itself."""
    items = list(items)
    if not shuffle:
        return items
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks inside `module` (entries of ModuleLists named layers/h/blocks)."""
    found: list[torch.nn.Module] = []
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            found.extend(child)
    return found


def _materialize(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a DTensor (e.g. the grad norm clip_grad_norm_ returns under FSDP2);
    a collective when the DTensor is partial, so callers run it on every rank in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rebind_cached_parameters(module: torch.nn.Module, replacement: dict[int, torch.nn.Parameter]) -> None:
    """Swap stale Parameters cached in plain attributes of `module` and its submodules (a list of
    them, or a dict whose values are Parameters or lists of them) for the sharded ones, in place."""

    def rebind_list(items: list) -> None:
        for i, item in enumerate(items):
            if isinstance(item, torch.nn.Parameter):
                items[i] = replacement.get(id(item), item)

    for owner in module.modules():
        for attr, value in vars(owner).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, list):
                rebind_list(value)
            elif isinstance(value, dict):
                for key, item in list(value.items()):
                    if isinstance(item, list):
                        rebind_list(item)
                    elif isinstance(item, torch.nn.Parameter):
                        value[key] = replacement.get(id(item), item)


def _buckets(params: list[torch.nn.Parameter], max_bytes: int) -> Iterable[list[torch.nn.Parameter]]:
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


def _sum_over_ranks(ctx: DistContext | None):
    """The `reduce_sum` for `fastrlhf.twins.advantages` statistics: an all-reduce over ranks,
    or None (this process only, bit-for-bit `fastrlhf.whiten`) without a multi-process context.
    The sums are detached before the in-place all-reduce: autograd cannot see through it, so across
    ranks the global mean/var are constants for the gradient (the trainers whiten detached targets)."""
    if ctx is None or not ctx.distributed:
        return None
    return lambda total: ctx.all_reduce_sum(total.detach().clone())


def global_masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, ctx: DistContext | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and UNBIASED variance of `x` over the tokens where `mask` is set, over ALL ranks.

    x, mask: [B, T] (any equal shapes). Two passes, as `fastrlhf.whiten`: one all-reduce of
    (count, sum) -> mean, then one of the sum of (x - mean)^2 (no E[x^2] - mean^2 cancellation).
    Returns scalars in float32 (float64 for float64 x); no masked-in token anywhere: mean 0, var 0.
    """
    check_whiten_args(x, mask, eps=0.0)  # eps is not used by the statistics
    x, m = twin_advantages.masked_input(x, mask)
    return twin_advantages.masked_mean_var(x, m, _sum_over_ranks(ctx))


def whiten_global(
    x: torch.Tensor,
    mask: torch.Tensor,
    ctx: DistContext | None = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Masked whitening with statistics over every rank's tokens (PPO advantages under DDP/FSDP).

    x, mask: [B, T] -> [B, T]. The same code as `fastrlhf.whiten` (TRL's `masked_whiten`: unbiased
    two-pass variance, (x - mean) * rsqrt(var + eps), mean added back when shift_mean=False) with
    its sums all-reduced: 0 outside the mask, float32 (float64 for float64 x). With one process (or
    ctx None) it IS `fastrlhf.whiten`, bit for bit and differentiable; across ranks no gradient
    flows through the global statistics.
    """
    reduce_sum = _sum_over_ranks(ctx)
    if reduce_sum is None:  # one process: the library function itself (its Triton kernel on CUDA)
        return whiten(x, mask, shift_mean=shift_mean, eps=eps)
    check_whiten_args(x, mask, eps)
    return twin_advantages.whiten_with_reduce(x, mask, shift_mean=shift_mean, eps=eps, reduce_sum=reduce_sum)
