"""Atomic training checkpoints: a run killed at any moment resumes from the last complete one.

Layout of `output_dir/checkpoint-<step>/`:

    model.safetensors    the weights the trainer chose to save (adapters + heads, or the full model)
    optimizer.pt         optimizer.state_dict()            (absent if no optimizer was given)
    scheduler.pt         lr scheduler state_dict()         (absent if none)
    rng_state.pt         list (one entry per rank) of python / numpy / torch CPU / CUDA RNG states
    trainer_state.pt     the trainer's dict: step, epoch, position in the epoch, KL controller, ...
    COMPLETE             written last; json with the step and file list

Atomicity: everything is written into `output_dir/.tmp-checkpoint-<step>-<pid>/`, each file and the
directory are fsync'ed, the `COMPLETE` marker is written, and only then the directory is renamed
(`os.replace`, atomic on POSIX) to `checkpoint-<step>`, followed by an fsync of `output_dir`. A
process killed mid-save leaves only a `.tmp-*` directory, which `latest_checkpoint` never returns
(and the next save removes). `latest_checkpoint` also requires the COMPLETE marker, so a directory
renamed by hand or copied half-way is not loaded either.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
TRAINER_STATE_FILE = "trainer_state.pt"
COMPLETE_MARKER = "COMPLETE"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


# ---------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python `random`, numpy, torch CPU and (if available) every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy and torch (every device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # different number of visible devices: restore what maps one to one
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)])


# ---------------------------------------------------------------------- save
def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | Mapping | None = None,
    scheduler: Any = None,
    trainer_state: Mapping[str, Any] | None = None,
    rng_states: list[dict] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically and return its path.

    model_state: name -> tensor (full tensors; under FSDP gather them on every rank first, e.g. with
        `fastrlhf.distributed.full_state_dict`). Saved as safetensors (tied/shared tensors are copied).
    optimizer, scheduler: objects with `.state_dict()` (or an optimizer state dict already gathered).
    trainer_state: any torch.save-able dict (step, epoch, batch position, KL controller, guard...).
    rng_states: one `capture_rng_state()` dict per rank (index = rank); None: this process's state.
    keep_last: if given, delete all but the newest `keep_last` complete checkpoints afterwards.
    Call on ONE process (rank 0); a second save of the same step replaces the old one atomically.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be None or >= 1, got {keep_last}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    files = [MODEL_FILE]
    _save_safetensors(model_state, tmp / MODEL_FILE)
    if optimizer is not None:
        state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
        _torch_save(state, tmp / OPTIMIZER_FILE)
        files.append(OPTIMIZER_FILE)
    if scheduler is not None:
        _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        files.append(SCHEDULER_FILE)
    _torch_save(rng_states if rng_states is not None else [capture_rng_state()], tmp / RNG_FILE)
    files.append(RNG_FILE)
    _torch_save(dict(trainer_state or {}, step=step), tmp / TRAINER_STATE_FILE)
    files.append(TRAINER_STATE_FILE)
    _write_text(tmp / COMPLETE_MARKER, json.dumps({"step": step, "files": files}))
    _fsync_dir(tmp)

    old = None
    if final.exists():  # os.replace cannot replace a non-empty directory: move it aside first
        old = output_dir / f".old-checkpoint-{step}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        for stale in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Delete leftovers of saves that were killed (only rank 0 ever saves, so none is in progress)."""
    for entry in output_dir.iterdir():
        if entry.is_dir() and (entry.name.startswith(_TMP_PREFIX) or entry.name.startswith(".old-checkpoint-")):
            shutil.rmtree(entry, ignore_errors=True)


def _save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] must be a tensor, got {type(value).__name__}")
        if type(value).__name__ == "DTensor":
            raise TypeError(
                f"model_state[{name!r}] is a sharded DTensor: gather the full state on every rank first "
                "(fastrlhf.distributed.full_state_dict) and save from rank 0"
            )
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses shared / partial storages (tied weights, views)
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    save_file(tensors, str(path))
    _fsync_file(path)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory; the rename still is atomic
        pass


# ---------------------------------------------------------------------- find / load
def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a renamed checkpoint directory with its COMPLETE marker and every listed file."""
    path = Path(path)
    if not _CHECKPOINT_RE.match(path.name) or not (path / COMPLETE_MARKER).is_file():
        return False
    try:
        info = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all((path / name).is_file() for name in info.get("files", []))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and is_complete_checkpoint(entry):
            found.append((int(match.group(1)), entry))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None (half-written ones never)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | os.PathLike | bool | None, output_dir: str | os.PathLike) -> Path | None:
    """Turn a `--resume` value into a checkpoint path.

    None / False / "" / "no": start fresh. "auto" / True: the latest complete checkpoint in
    `output_dir` (None if there is none yet, so the same command starts or continues a run).
    Anything else: that checkpoint directory, which must be complete (ValueError otherwise).
    """
    if resume in (None, False, "", "no", "none", "false"):
        return None
    if resume is True or str(resume) in ("auto", "latest", "true"):
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"resume={str(resume)!r} is not a complete checkpoint directory "
            f"(expected checkpoint-<step>/ containing {COMPLETE_MARKER}); use resume='auto' for the latest"
        )
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    rank: int = 0,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint: returns (model_state, trainer_state) and restores the rest in place.

    optimizer / scheduler: their `load_state_dict` is called when given (and the file exists).
    restore_rng: restore python / numpy / torch / CUDA RNG states of `rank` (rank 0's when the
    checkpoint has fewer ranks). The caller loads model_state into its model (e.g.
    `model.load_state_dict(state, strict=False)` or `RoleModel.load_role_state_dict`).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete_checkpoint(path):
        raise ValueError(f"{path} is not a complete checkpoint (missing {COMPLETE_MARKER} or files)")
    model_state = load_file(str(path / MODEL_FILE), device=str(map_location))
    if optimizer is not None and (path / OPTIMIZER_FILE).is_file():
        optimizer.load_state_dict(_torch_load(path / OPTIMIZER_FILE, map_location))
    if scheduler is not None and (path / SCHEDULER_FILE).is_file():
        scheduler.load_state_dict(_torch_load(path / SCHEDULER_FILE, map_location))
    if restore_rng and (path / RNG_FILE).is_file():
        states = _torch_load(path / RNG_FILE, "cpu")
        restore_rng_state(states[rank] if rank < len(states) else states[0])
    trainer_state = _torch_load(path / TRAINER_STATE_FILE, map_location)
    return model_state, trainer_state


def load_optimizer_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict | None:
    """The raw optimizer state dict of a checkpoint (e.g. to hand to FSDP's set_optimizer_state_dict)."""
    file = Path(path) / OPTIMIZER_FILE
    return _torch_load(file, map_location) if file.is_file() else None


def _torch_load(path: Path, map_location) -> Any:
    # RNG states hold numpy arrays and python tuples: the checkpoint is our own file, so allow them.
    return torch.load(path, map_location=map_location, weights_only=False)
