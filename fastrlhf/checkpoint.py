"""Atomic, verified training checkpoints: a run killed at any moment resumes from the last intact one.

Layout of `output_dir/checkpoint-<step>/`:

    model.safetensors    the weights the trainer chose to save (adapters + heads, or the full model)
    optimizer.pt         optimizer.state_dict()            (absent if no optimizer was given)
    scheduler.pt         lr scheduler state_dict()         (absent if none)
    rng_state.pt         list (one entry per rank) of python / numpy / torch CPU / CUDA RNG states,
                         stored as tensors and plain values (no numpy objects)
    trainer_state.pt     the trainer's dict: step, data position, KL controller, ...
    run.json             the run's identity (configuration, data fingerprint), when the caller gives one
    COMPLETE             written last: the manifest, json {"format": 2, "step", "run_id",
                         "files": {name: {"bytes", "sha256"}}}

Atomicity: everything is written into `output_dir/.tmp-checkpoint-<step>-<pid>/`, each file and the
directory are fsync'ed, the `COMPLETE` manifest is written, and only then the directory is renamed
(`os.replace`, atomic on POSIX) to `checkpoint-<step>`, followed by an fsync of `output_dir`. A
process killed mid-save leaves only a `.tmp-*` directory, which is never loaded (and the next save
removes it). A directory without the marker, or missing a listed file, is not a checkpoint.

Verification: the manifest records every file's size and SHA-256 (about 1 s per GB on one core, at
save and at load). `verify_checkpoint` recomputes them; `resolve_resume("auto")` skips a checkpoint
whose files do not match, with a warning naming the file, and takes the newest intact one.

Safe loading: every `.pt` file is read with `torch.load(weights_only=True)` (tensors and plain
containers only), so a checkpoint from elsewhere cannot run code when it is loaded; RNG states are
written as tensors for that reason. RNG files of older versions (numpy arrays inside) are read with
exactly the numpy array types allow-listed, as transformers' Trainer does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
TRAINER_STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
COMPLETE_MARKER = "COMPLETE"
MANIFEST_FORMAT = 2

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_HASH_CHUNK = 16 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a file missing, of the wrong size or checksum, unreadable,
    or holding objects that are not tensors / plain data. The message names the file."""


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
    """Inverse of `capture_rng_state` (also takes the tensor form written to rng_state.pt)."""
    state = _rng_from_tensors(state)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # different number of visible devices: restore what maps one to one
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)])


def _rng_to_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """The RNG state as tensors and plain values, which `torch.load(weights_only=True)` reads
    without allow-listing any type: python's (version, 625 ints, gauss) and numpy's
    ("MT19937", uint32 keys, pos, has_gauss, cached) tuples become dicts holding int64 tensors."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _rng_from_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `_rng_to_tensors`; a state already in `capture_rng_state`'s form is returned as is."""
    python, numpy_state = state["python"], state["numpy"]
    if not isinstance(python, Mapping):
        return dict(state)
    out = dict(state)
    out["python"] = (python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"])
    out["numpy"] = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                    numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    return out


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
    run_record: Mapping[str, Any] | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically and return its path.

    model_state: name -> tensor (full tensors; under FSDP gather them on every rank first, e.g. with
        `fastrlhf.distributed.full_state_dict`). Saved as safetensors (tied/shared tensors are copied).
    optimizer, scheduler: objects with `.state_dict()` (or an optimizer state dict already gathered).
    trainer_state: a dict of tensors and plain values (step, data position, KL controller, guard...).
    rng_states: one `capture_rng_state()` dict per rank (index = rank); None: this process's state.
    keep_last: if given, delete all but the newest `keep_last` complete checkpoints of this run
        afterwards (those whose manifest has the same run_id; other runs' checkpoints are never deleted).
    run_record: the run's identity, a JSON-able dict with a "run_id" (see fastrlhf.trainers.run_dir);
        written as run.json, and its run_id into the manifest.
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
    rng_states = rng_states if rng_states is not None else [capture_rng_state()]
    _torch_save([_rng_to_tensors(s) for s in rng_states], tmp / RNG_FILE)
    files.append(RNG_FILE)
    _torch_save(dict(trainer_state or {}, step=step), tmp / TRAINER_STATE_FILE)
    files.append(TRAINER_STATE_FILE)
    run_id = None
    if run_record is not None:
        run_id = run_record.get("run_id")
        write_text_atomic(tmp / RUN_FILE, json.dumps(run_record, indent=2, default=str))
        files.append(RUN_FILE)
    manifest = {"format": MANIFEST_FORMAT, "step": step, "run_id": run_id,
                "files": {name: _file_entry(tmp / name) for name in files}}
    _write_text(tmp / COMPLETE_MARKER, json.dumps(manifest, indent=1))
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
        own = [p for p in list_checkpoints(output_dir) if checkpoint_run_id(p) == run_id]
        for stale in own[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old or the new file, never
    a part: write a temp file beside it, fsync, rename over it, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


# ---------------------------------------------------------------------- find / verify
def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The COMPLETE manifest of a checkpoint directory as {"step", "run_id", "files": {name: entry}}
    (entry {} for manifests of older versions, which listed names only); None when absent/unreadable."""
    try:
        info = json.loads((Path(path) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    files = info.get("files", [])
    if isinstance(files, list):
        files = {name: {} for name in files}
    if not isinstance(files, dict):
        return None
    return {"step": info.get("step"), "run_id": info.get("run_id"), "files": files}


def checkpoint_run_id(path: str | os.PathLike) -> str | None:
    manifest = read_manifest(path)
    return None if manifest is None else manifest["run_id"]


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a renamed checkpoint directory with its COMPLETE marker and every listed
    file (sizes and checksums are `verify_checkpoint`'s job)."""
    path = Path(path)
    if not _CHECKPOINT_RE.match(path.name):
        return False
    manifest = read_manifest(path)
    return manifest is not None and all((path / name).is_file() for name in manifest["files"])


def verify_checkpoint(path: str | os.PathLike, *, checksums: bool = True) -> None:
    """CheckpointError naming the first file that is missing or whose size (or SHA-256) differs
    from the manifest. Manifests of older versions record no sizes: only presence is checked."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: no readable {COMPLETE_MARKER} manifest (the save did not finish)")
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {COMPLETE_MARKER})")
        size = file.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {entry['bytes']} "
                                  "(truncated or overwritten)")
    if checksums:
        for name, entry in manifest["files"].items():
            if "sha256" in entry and file_sha256(path / name) != entry["sha256"]:
                raise CheckpointError(f"{path / name}: SHA-256 differs from the manifest (the file is corrupted)")


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


def latest_intact_checkpoint(output_dir: str | os.PathLike, *, run_id: str | None = None,
                             warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint in `output_dir` that passes `verify_checkpoint` (and belongs
    to `run_id` when given: checkpoints of another run are not considered; those of older versions,
    which record no run, are). Each newer one that fails is reported through `warn` (default:
    `warnings.warn`) with the file at fault, and skipped. None when there is none."""
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    for path in _newest_first(output_dir, run_id):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            warn(f"skipping {path.name}: {error}; falling back to an older checkpoint")
            continue
        return path
    return None


def _newest_first(output_dir: str | os.PathLike, run_id: str | None) -> list[Path]:
    """Complete checkpoints of run `run_id` (and of older versions, which record none), newest first."""
    return [path for path in reversed(list_checkpoints(output_dir))
            if run_id is None or checkpoint_run_id(path) in (None, run_id)]


def resolve_resume(resume: str | os.PathLike | bool | None, output_dir: str | os.PathLike, *,
                   run_id: str | None = None, warn: Callable[[str], None] | None = None) -> Path | None:
    """Turn a `--resume` value into a checkpoint path.

    None / False / "" / "no": start fresh. "auto" / True: the newest intact checkpoint in
    `output_dir` (`latest_intact_checkpoint`: corrupted ones are skipped with a warning; None if
    there is none yet, so the same command starts or continues a run). Anything else: that
    checkpoint directory, which must be complete and intact (CheckpointError naming the file).
    """
    if resume in (None, False, "", "no", "none", "false"):
        return None
    if resume is True or str(resume) in ("auto", "latest", "true"):
        return latest_intact_checkpoint(output_dir, run_id=run_id, warn=warn)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={str(resume)!r}: no such directory; use resume='auto' for the latest "
                              f"checkpoint in the output directory")
    if not is_complete_checkpoint(path):
        raise CheckpointError(
            f"resume={str(resume)!r} is not a complete checkpoint directory "
            f"(expected checkpoint-<step>/ containing {COMPLETE_MARKER}); use resume='auto' for the latest"
        )
    verify_checkpoint(path)
    return path


def read_run_record(path: str | os.PathLike) -> dict | None:
    """The run.json of a checkpoint (or output) directory; None when there is none or it is unreadable."""
    try:
        record = json.loads((Path(path) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------- load
@dataclasses.dataclass
class CheckpointContents:
    """Everything a checkpoint holds, read into memory (`read_checkpoint`) before any of it is
    applied, so that a file that cannot be read leaves the model and optimizer untouched."""

    path: Path
    model_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    rng_states: list | None = None
    run_record: dict | None = None

    def rng_state(self, rank: int) -> dict | None:
        """`rank`'s RNG state (rank 0's when the checkpoint has fewer ranks)."""
        if not self.rng_states:
            return None
        return self.rng_states[rank] if rank < len(self.rng_states) else self.rng_states[0]


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    verify: bool = True) -> CheckpointContents:
    """Read (and by default verify) every file of a checkpoint; CheckpointError naming the file
    that is missing, corrupted, unreadable or holds objects `torch.load(weights_only=True)` refuses."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete_checkpoint(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {COMPLETE_MARKER} or files)")
    if verify:
        verify_checkpoint(path)
    try:
        model_state = load_file(str(path / MODEL_FILE), device=str(map_location))
    except Exception as error:  # safetensors raises its own error types for a damaged header or data
        raise CheckpointError(f"{path / MODEL_FILE}: cannot be read ({type(error).__name__}: {error})") from None
    optional = {name: _torch_load(path / name, map_location) if (path / name).is_file() else None
                for name in (OPTIMIZER_FILE, SCHEDULER_FILE)}
    rng = _torch_load(path / RNG_FILE, "cpu") if (path / RNG_FILE).is_file() else None
    trainer_state = _torch_load(path / TRAINER_STATE_FILE, map_location)
    if not isinstance(trainer_state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE_FILE}: expected a dict, got {type(trainer_state).__name__}")
    return CheckpointContents(path=path, model_state=model_state, trainer_state=trainer_state,
                              optimizer_state=optional[OPTIMIZER_FILE], scheduler_state=optional[SCHEDULER_FILE],
                              rng_states=rng, run_record=read_run_record(path))


def read_resume_checkpoint(resume: str | os.PathLike | bool | None, output_dir: str | os.PathLike, *,
                           run_id: str | None = None, map_location: str | torch.device = "cpu",
                           warn: Callable[[str], None] | None = None) -> CheckpointContents | None:
    """`resolve_resume`, then `read_checkpoint`: the contents of the checkpoint to resume from, or
    None for a fresh start. With "auto", a checkpoint that fails verification OR cannot be read
    (e.g. a file `torch.load(weights_only=True)` refuses) is skipped with a warning naming the file,
    and the next older one is tried. An explicit path that fails raises CheckpointError."""
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    if resume is True or str(resume) in ("auto", "latest", "true"):
        for path in _newest_first(output_dir, run_id):
            try:
                return read_checkpoint(path, map_location=map_location)
            except CheckpointError as error:
                warn(f"skipping {path.name}: {error}; falling back to an older checkpoint")
        return None
    path = resolve_resume(resume, output_dir, run_id=run_id, warn=warn)
    return None if path is None else read_checkpoint(path, map_location=map_location, verify=False)


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

    Every file is verified against the manifest and read before anything is restored
    (`read_checkpoint`; CheckpointError naming the file otherwise).
    optimizer / scheduler: their `load_state_dict` is called when given (and the file exists).
    restore_rng: restore python / numpy / torch / CUDA RNG states of `rank` (rank 0's when the
    checkpoint has fewer ranks). The caller loads model_state into its model (e.g.
    `model.load_state_dict(state, strict=False)` or `RoleModel.load_role_state_dict`).
    """
    contents = read_checkpoint(path, map_location=map_location)
    if optimizer is not None and contents.optimizer_state is not None:
        optimizer.load_state_dict(contents.optimizer_state)
    if scheduler is not None and contents.scheduler_state is not None:
        scheduler.load_state_dict(contents.scheduler_state)
    if restore_rng and contents.rng_states:
        restore_rng_state(contents.rng_state(rank))
    return contents.model_state, contents.trainer_state


def load_optimizer_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict | None:
    """The raw optimizer state dict of a checkpoint (e.g. to hand to FSDP's set_optimizer_state_dict)."""
    file = Path(path) / OPTIMIZER_FILE
    return _torch_load(file, map_location) if file.is_file() else None


def _legacy_numpy_globals() -> list:
    """What a pickled numpy RNG state of older versions needs (and nothing else): the array
    reconstructor, ndarray, dtype and the uint32 dtype class, as transformers' Trainer allow-lists."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _torch_load(path: Path, map_location) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never code. The only
    types allowed besides are the numpy ones of older RNG files (`_legacy_numpy_globals`)."""
    import pickle

    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain data, which "
            f"fastrlhf never writes (torch.load(weights_only=True): {first_line[:200]})"
        ) from None
    except Exception as error:  # truncated zip, bad header, ...
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
