"""One output directory, one run: what the directory records about its run, and the rules that keep
two runs apart.

`OUTPUT_DIR/run.json` (and a copy in every checkpoint) is the run's identity: a run id, the trainer,
its whole configuration, the model (base name, roles, LoRA settings) and a fingerprint of the
training data (number of records and SHA-256 of their canonical JSON). `plan_run` applies the rules
before anything is trained:

- a new run (no `resume`) refuses a directory that is not empty, unless `overwrite_output_dir`,
  which first removes what an earlier fastrlhf run wrote there (`RUN_OUTPUTS`; other files stay);
- `resume="auto"` continues the run recorded in the directory only when this run is the same run:
  every option, the model and the data equal, except the harmless ones in `RESUME_OVERRIDABLE`
  (run length, batch geometry, logging / evaluation / saving cadence, progress bar); otherwise it
  refuses and lists the differences;
- `resume=PATH` (a checkpoint) applies the same comparison to the checkpoint's own record, and
  continues into its own directory or an empty one;
- checkpoint rotation (`save_total_limit`) deletes only checkpoints with this run's id.

A directory written by an older fastrlhf (trainer_config.json, checkpoints without run.json) is
compared on its configuration alone.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

from fastrlhf.checkpoint import RUN_FILE, list_checkpoints, read_run_record, write_text_atomic
from fastrlhf.options import option_name

RUN_FORMAT = 1
LEGACY_CONFIG_FILE = "trainer_config.json"  # what older versions recorded (and every version still writes)

# Options a resumed run may change: they set how long it runs, how its batches are cut (the data
# position is kept in examples), how often it logs, evaluates and saves, and what it shows, but
# not what it optimises (activation checkpointing recomputes the same values: memory only). max_steps /
# epochs may grow, never below the checkpoint's step.
RESUME_OVERRIDABLE = frozenset({
    "max_steps", "epochs", "batch_size", "grad_accum_steps", "eval_batch_size", "fsdp", "gradient_checkpointing",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "save_final", "progress", "report_to",
    "max_consecutive_nonfinite",
})
# Options that say where and how to start, not what the run is.
NOT_PART_OF_THE_RUN = frozenset({"output_dir", "resume", "overwrite_output_dir"})

# What a fastrlhf run writes into its output directory: removed by overwrite_output_dir so that
# nothing of the earlier run (checkpoints above all: resume and rotation look at them) mixes with
# the new one. Patterns as in Path.match.
RUN_OUTPUTS = (
    "checkpoint-*", ".tmp-checkpoint-*", ".old-checkpoint-*", RUN_FILE, LEGACY_CONFIG_FILE, "metrics.jsonl",
    "tensorboard", "memory_report.json", "summary.json", "merged", "role-*.safetensors", "fastrlhf_roles.json",
)


class RunDirError(ValueError):
    """The output directory (or the checkpoint to resume from) belongs to another run, or cannot be
    used; the message says why and what to do."""


# ---------------------------------------------------------------------- the record
def data_fingerprint(records: Sequence[dict]) -> dict[str, Any]:
    """{"records": count, "sha256": of the records' canonical JSON}: equal for equal data, in order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return {"records": len(records), "sha256": digest.hexdigest()}


def model_identity(model) -> dict[str, Any]:
    """What of the model makes the run: the base model's name or path (resolved when it is a local
    directory), the roles, trained roles and LoRA settings of a RoleModel."""
    causal_lm = getattr(model, "causal_lm", model)
    base = str(getattr(getattr(causal_lm, "config", None), "_name_or_path", "") or "")
    if base and os.path.exists(base):
        base = os.path.realpath(base)
    identity: dict[str, Any] = {"base": base}
    for name in ("roles", "trainable_roles", "use_lora"):
        if hasattr(model, name):
            value = getattr(model, name)
            identity[name] = list(value) if isinstance(value, (tuple, list)) else value
    identity.update(getattr(model, "lora_settings", {}) or {})
    return _as_json(identity)


def run_record(trainer: str, config, *, model=None, train_records: Sequence[dict] | None = None,
               world_size: int = 1, run_id: str | None = None) -> dict[str, Any]:
    """The identity of a run (what run.json holds). model / train_records None: not recorded (the
    command line checks the directory before the model is loaded, and then compares without it)."""
    from fastrlhf import __version__

    record: dict[str, Any] = {
        "format": RUN_FORMAT,
        "run_id": run_id or new_run_id(),
        "trainer": trainer,
        "config": _as_json(config.to_dict()),
        "world_size": world_size,
        "fastrlhf_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if model is not None:
        record["model"] = model_identity(model)
    if train_records is not None:
        record["data"] = data_fingerprint(train_records)
    return record


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def write_run_record(output_dir: str | os.PathLike, record: dict) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(output_dir) / RUN_FILE, json.dumps(record, indent=2))


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------- comparing two records
def run_differences(saved: dict, current: dict) -> list[str]:
    """One line per difference between a saved run record and this run's, ignoring the options a
    resume may change (`RESUME_OVERRIDABLE`) and what is not recorded on both sides."""
    lines = []
    if saved.get("trainer") and current.get("trainer") and saved["trainer"] != current["trainer"]:
        lines.append(f"trainer: {saved['trainer']} -> {current['trainer']}")
    old, new = saved.get("config", {}), current.get("config", {})
    for name in sorted(set(old) | set(new)):
        if name in RESUME_OVERRIDABLE or name in NOT_PART_OF_THE_RUN:
            continue
        # an option only one side has comes from another version of fastrlhf: not a difference
        if name in old and name in new and old[name] != new[name]:
            lines.append(f"{option_name(name)}: {old[name]!r} -> {new[name]!r}")
    if "model" in saved and "model" in current:
        for key in sorted(set(saved["model"]) | set(current["model"])):
            a, b = saved["model"].get(key), current["model"].get(key)
            if a != b:
                lines.append(f"model {key}: {a!r} -> {b!r}")
    if "data" in saved and "data" in current and saved["data"] != current["data"]:
        a, b = saved["data"], current["data"]
        lines.append(f"training data: {a.get('records')} records (sha256 {str(a.get('sha256'))[:12]}) -> "
                     f"{b.get('records')} records (sha256 {str(b.get('sha256'))[:12]})")
    return lines


def allowed_changes(saved: dict, current: dict) -> list[str]:
    """The options in `RESUME_OVERRIDABLE` that this resume changes, as "name: old -> new"."""
    old, new = saved.get("config", {}), current.get("config", {})
    return [f"{name}: {old[name]!r} -> {new[name]!r}" for name in sorted(RESUME_OVERRIDABLE)
            if name in old and name in new and old[name] != new[name]]


# ---------------------------------------------------------------------- the rules
@dataclasses.dataclass
class RunPlan:
    """What `plan_run` decided: resume (None: start fresh; "auto" or a checkpoint path: what
    `read_trainer_checkpoint` looks for), the run id this run records, the earlier outputs to remove
    before it starts (`apply`), and notes for the log (options a resume changes)."""

    resume: str | None
    run_id: str
    remove: list[Path] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def apply(self) -> None:
        for path in self.remove:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def plan_run(output_dir: str | os.PathLike, *, resume: str | None, overwrite: bool, current: dict) -> RunPlan:
    """Decide how a run with record `current` starts in `output_dir` (reads only; RunPlan.apply
    removes). RunDirError with the reason and the way out when the rules above refuse it."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {str(out)!r} is a file, not a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if resume is None:
        if entries and not overwrite:
            raise RunDirError(_occupied(out, entries))
        return RunPlan(resume=None, run_id=current["run_id"], remove=_run_outputs(entries) if overwrite else [])

    if str(resume) in ("auto", "latest", "true") or resume is True:
        saved = directory_record(out)
        if saved is None:
            if entries:
                raise RunDirError(
                    f"resume='auto': {out} holds files but no fastrlhf run to resume (no {RUN_FILE}, "
                    f"{LEGACY_CONFIG_FILE} or checkpoint): choose an empty --output-dir, or start a new run "
                    f"here with --overwrite-output-dir")
            return RunPlan(resume=None, run_id=current["run_id"])
        _check_same_run(saved, current, where=f"{out}")
        return RunPlan(resume="auto", run_id=saved.get("run_id") or current["run_id"],
                       notes=allowed_changes(saved, current))

    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise RunDirError(f"resume={str(resume)!r}: no such checkpoint directory "
                          f"(give OUTPUT_DIR/checkpoint-<step>, or 'auto' for the latest in --output-dir)")
    saved = read_run_record(checkpoint) or _legacy_record(checkpoint.parent)
    if saved is not None:
        _check_same_run(saved, current, where=str(checkpoint))
    own_dir = out.resolve() == checkpoint.parent.resolve()
    if entries and not own_dir:
        here = directory_record(out)
        if here is None or saved is None or here.get("run_id") != saved.get("run_id"):
            raise RunDirError(
                f"resume={str(resume)!r}: the output directory {out} is not empty and is not that checkpoint's "
                f"run: continue into the checkpoint's own directory ({checkpoint.parent}) or an empty --output-dir")
    run_id = (saved or {}).get("run_id") or current["run_id"]
    return RunPlan(resume=str(checkpoint), run_id=run_id, notes=allowed_changes(saved or {}, current))


def directory_record(out: Path) -> dict | None:
    """The record of the run in `out`: run.json, else the newest checkpoint's run.json, else (older
    versions) the configuration in trainer_config.json; None when there is none."""
    record = read_run_record(out)
    if record is not None:
        return record
    for checkpoint in reversed(list_checkpoints(out)):
        record = read_run_record(checkpoint)
        if record is not None:
            return record
    return _legacy_record(out)


def _legacy_record(out: Path) -> dict | None:
    try:
        config = json.loads((out / LEGACY_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {"config": config} if isinstance(config, dict) else None


def _check_same_run(saved: dict, current: dict, *, where: str) -> None:
    differences = run_differences(saved, current)
    if differences:
        listed = "\n  ".join(differences)
        raise RunDirError(
            f"cannot resume: {where} holds a different run; these differ (that run -> this command):\n  {listed}\n"
            f"Resume with that run's options (they are in {RUN_FILE} / {LEGACY_CONFIG_FILE}); only "
            f"{', '.join(option_name(n) for n in sorted(RESUME_OVERRIDABLE))} may change on a resume. "
            f"Or start a new run: another --output-dir, or --overwrite-output-dir without --resume.")


def _occupied(out: Path, entries: list[Path]) -> str:
    record = directory_record(out)
    if record is not None:
        checkpoints = list_checkpoints(out)
        what = (f"a fastrlhf run ({record.get('trainer', 'trainer')}"
                + (f", last checkpoint {checkpoints[-1].name}" if checkpoints else ", no checkpoint") + ")")
        how = "continue it with --resume auto, replace it with --overwrite-output-dir, or choose another --output-dir"
    else:
        shown = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        what = f"{len(entries)} entries ({shown})"
        how = ("choose another (or an empty) --output-dir, or pass --overwrite-output-dir (which removes only what "
               "a fastrlhf run writes; other files stay)")
    return f"output_dir {str(out)!r} is not empty: it holds {what}; {how}"


def _run_outputs(entries: list[Path]) -> list[Path]:
    return [p for p in entries if any(p.match(pattern) for pattern in RUN_OUTPUTS)]
