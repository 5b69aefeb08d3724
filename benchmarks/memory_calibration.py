"""Calibration of the memory simulator (`fastrlhf.planner`) against measured peaks.

    python -m benchmarks.memory_calibration            # -> benchmarks/results/memory_calibration.csv
    python -m benchmarks.memory_calibration --gpu-rows  # only the H200 rows (about 2 minutes)
    python -m benchmarks.memory_calibration --cpu-rows  # only the CPU rows

GPU rows: the e2e rows of benchmarks/results/nvidia-h200.csv (PPO and DPO steps, Qwen2-0.5B shape,
B=8, T=1024, bf16, measured as torch.cuda.max_memory_allocated() minus what was allocated before the
models were built) were measured at commit a217878. They are predicted by running THAT commit's own
benchmark code (benchmarks/e2e.py: build_ppo / ppo_step_fn, build_dpo / dpo_step_fn) and fastrlhf
package on fake tensors: `git archive a217878` is unpacked into a temporary directory, this
simulator is copied next to it, and a worker process imports that tree. A second worker runs the
current tree, to say what today's code would measure. Each step runs once to create the optimizer
state (as the benchmark does), then once under the counter; 2 and 3 of the 24 layers are
simulated and the peak extrapolated (`fastrlhf.planner.simulate`). TRL is not installed here: the
trl-style rows use `fastrlhf.planner.trl_style.selective_log_softmax`, TRL's algorithm.

CPU rows: a real step on the CPU (random weights, fp32, the trainers' CPU code paths) measured by the
counter on real tensors, against the simulator's prediction of the same step on fake tensors
(extrapolated over layers for the 30-layer SmolLM2-135M shape). profiler_bytes: the same real step
measured independently by torch.profiler's CPU allocator events (which also see buffers allocated
inside kernels), plus what was allocated before the step.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
H200_CSV = RESULTS / "nvidia-h200.csv"
OUT_CSV = RESULTS / "memory_calibration.csv"
MEASURED_COMMIT = "a217878"
E2E_B, E2E_T = 8, 1024
E2E_ROWS = [(step, kind) for step in ("e2e_ppo_step", "e2e_dpo_step")
            for kind in ("fastrlhf-shared-lora", "separate-models-fused", "trl-style")]
FIELDS = ("source", "model", "step", "setup", "shape", "code", "measured_bytes", "predicted_bytes", "error",
          "predicted_reserved_bytes", "profiler_bytes", "method", "seconds")


# ---------------------------------------------------------------------------- worker: e2e on fake tensors


def _e2e_result(step_name: str, kind: str, n_layers: int, *, legacy_upcast: bool):
    """One e2e step of the importable tree (old or current) on fake tensors -> StepResult."""
    import fastrlhf
    from benchmarks import e2e, peers
    from fastrlhf.planner import cuda, trl_style
    from fastrlhf.planner.configs import with_layers
    from fastrlhf.planner.counter import MemoryCounter
    from fastrlhf.planner.fake import decoder_layers, fakeify, new_fake_mode
    from fastrlhf.planner.steps import StepResult, _legacy_peft_upcast, role_of_parameters

    peers.trl_selective_log_softmax = trl_style.selective_log_softmax  # TRL's algorithm, TRL not installed
    _, config = e2e.model_config(quick=False, gpu=True)
    config = with_layers(config, n_layers)
    build, make_step = {"e2e_ppo_step": (e2e.build_ppo, e2e.ppo_step_fn),
                        "e2e_dpo_step": (e2e.build_dpo, e2e.dpo_step_fn)}[step_name]
    mode = new_fake_mode()
    counter = MemoryCounter(block_bytes=512, scalar_answers=True)
    role_names = ("policy", "reference", "value", "reward")
    started = time.perf_counter()
    with cuda.cuda_semantics(), (_legacy_peft_upcast() if legacy_upcast else _null()), \
            torch.random.fork_rng(devices=[]), fastrlhf.use_backend("auto"):
        torch.manual_seed(0)
        forward, params, modules = build(kind, config, "meta", torch.bfloat16)
        memo = fakeify(modules, mode)
        params = [memo.get(id(p), p) for p in params]
        owner = {}
        if kind == "fastrlhf-shared-lora":
            owner = role_of_parameters(modules[0])
        else:
            for role, module in zip(role_names, modules):
                for t in [*module.parameters(), *module.buffers()]:
                    owner.setdefault(id(t), role)
        ids, am, loss_mask = e2e._batch(E2E_B, E2E_T, config.vocab_size, "cpu")
        with mode, counter:
            for module in modules:
                for t in [*module.parameters(), *module.buffers()]:
                    counter.track(t, "parameters", owner.get(id(t), "other"))
            for module in modules:
                counter.layers.watch(decoder_layers(module))
            batch = [mode.from_tensor(t) for t in (ids, am, loss_mask)]
            step = make_step(forward, params, *batch)
            with counter.label(phase="setup"):
                step()  # the benchmark's first call: allocates the optimizer state
            counter.relabel_category("temporaries", "optimizer")
            counter.reset_peaks()
            with counter.saved_tensors_hooks():
                step()
            counter.close()
    return StepResult(n_layers=n_layers, peak=counter.peak, phase_peaks=counter.phase_peaks,
                      region_peaks=counter.region_peaks, seconds=time.perf_counter() - started)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def worker_e2e(legacy_upcast: bool) -> list[dict]:
    from benchmarks import e2e
    from fastrlhf.planner.simulate import extrapolate

    _, config = e2e.model_config(quick=False, gpu=True)
    rows = []
    for step_name, kind in E2E_ROWS:
        small = _e2e_result(step_name, kind, 2, legacy_upcast=legacy_upcast)
        large = _e2e_result(step_name, kind, 3, legacy_upcast=legacy_upcast)
        regions, notes = extrapolate(small, large, config.num_hidden_layers)
        peak = max(regions.values(), key=lambda s: s.total)
        rows.append({"step": step_name, "setup": kind, "predicted_bytes": peak.total,
                     "predicted_reserved_bytes": max(peak.reserved, peak.total),
                     "by_category": peak.by(0), "seconds": round(small.seconds + large.seconds, 1), "notes": notes})
    return rows


# ---------------------------------------------------------------------------- driver


def _export_tree(commit: str, into: Path) -> Path:
    """`git archive commit` unpacked into `into`, with this simulator copied in (package + script)
    and the top-level kernels/ placed where the installed package has it (fastrlhf/kernels)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.copytree(ROOT / "fastrlhf" / "planner", into / "fastrlhf" / "planner", dirs_exist_ok=True)
    shutil.copy(Path(__file__), into / "benchmarks" / Path(__file__).name)
    if (into / "kernels").is_dir() and not (into / "fastrlhf" / "kernels").exists():
        shutil.copytree(into / "kernels", into / "fastrlhf" / "kernels")
    _add_missing_checks(into)
    return into


def _add_missing_checks(tree: Path) -> None:
    """The simulator validates its spec with `fastrlhf._checks` functions an older tree may not have
    (e.g. check_int): append today's definitions of exactly those, self-contained ones, to the old
    module. Nothing the old code defines is replaced, so the old code still runs its own checks."""
    import ast

    wanted = set()
    for source in (ROOT / "fastrlhf" / "planner").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fastrlhf._checks":
                wanted.update(alias.name for alias in node.names)
    old_path = tree / "fastrlhf" / "_checks.py"
    old_source = old_path.read_text()
    defined = {node.name for node in ast.parse(old_source).body if isinstance(node, ast.FunctionDef)}
    today = (ROOT / "fastrlhf" / "_checks.py").read_text()
    added = [ast.get_source_segment(today, node) for node in ast.parse(today).body
             if isinstance(node, ast.FunctionDef) and node.name in wanted - defined]
    if added:
        old_path.write_text(old_source + "\n\n# added by benchmarks/memory_calibration.py for the simulator\n"
                            + "\n\n".join(added) + "\n")


def _run_worker(tree: Path, legacy_upcast: bool) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree), FASTRLHF_BACKEND="auto")
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "benchmarks.memory_calibration", "--worker-e2e"]
    if legacy_upcast:
        command.append("--legacy-upcast")
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"calibration worker in {tree} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measured_h200() -> dict[tuple[str, str], int]:
    out = {}
    with open(H200_CSV) as f:
        for row in csv.DictReader(f):
            if row["kernel"].startswith("e2e_") and row["status"] == "ok" and "ckpt" not in row["shape"]:
                out[(row["kernel"], row["provider"])] = int(row["peak_bytes"])
    return out


def gpu_rows() -> list[dict]:
    measured = _measured_h200()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastrlhf-calibration-") as tmp:
        old = _export_tree(MEASURED_COMMIT, Path(tmp) / "old")
        runs = [("a217878 (measured code)", old, False), ("HEAD (current code)", ROOT, False),
                ("HEAD with peft's fp32 upcast (before 6828f2e)", ROOT, True)]
        for code, tree, legacy in runs:
            for row in _run_worker(tree, legacy):
                meas = measured.get((row["step"], row["setup"]))
                rows.append({
                    "source": "NVIDIA H200 (nvidia-h200.csv)", "model": "qwen2-0.5b", "step": row["step"],
                    "setup": row["setup"], "shape": f"B={E2E_B},T={E2E_T} bf16", "code": code,
                    "measured_bytes": meas if code.startswith("a217878") else "",
                    "predicted_bytes": row["predicted_bytes"],
                    "error": f"{row['predicted_bytes'] / meas - 1:+.3f}" if meas and code.startswith("a217878") else "",
                    "predicted_reserved_bytes": row["predicted_reserved_bytes"],
                    "method": "benchmarks/e2e.py of that commit on fake tensors, 2+3 of 24 layers extrapolated",
                    "seconds": row["seconds"],
                })
    return rows


CPU_CASES = (
    # (model, stage, setup, batch, seq_len, prompt_len)
    ("tiny", "sft", "shared-lora", 4, 64, 16), ("tiny", "dpo", "shared-lora", 4, 64, 16),
    ("tiny", "ppo", "shared-lora", 4, 64, 16), ("tiny", "sft", "full", 4, 64, 16),
    ("tiny", "dpo", "full", 4, 64, 16), ("tiny", "ppo", "full", 4, 64, 16),
    ("SmolLM2-135M", "sft", "shared-lora", 2, 64, 16), ("SmolLM2-135M", "dpo", "shared-lora", 2, 64, 16),
    ("SmolLM2-135M", "ppo", "shared-lora", 2, 64, 16), ("SmolLM2-135M", "ppo", "full", 2, 64, 16),
)


def cpu_config(name: str):
    from fastrlhf.planner.configs import load_config
    from fastrlhf.testing import tiny_llama, tiny_tokenizer

    if name == "tiny":
        return tiny_llama(vocab_size=len(tiny_tokenizer()), tie=True).config
    return load_config(name)[0]


def cpu_rows() -> list[dict]:
    from fastrlhf.planner.simulate import simulate
    from fastrlhf.planner.steps import StepSpec, run_step

    rows = []
    for model, stage, setup, batch, seq_len, prompt_len in CPU_CASES:
        config = cpu_config(model)
        spec = StepSpec(stage=stage, setup=setup, batch_size=batch, seq_len=seq_len, prompt_len=prompt_len,
                        dtype="fp32")
        real = run_step(spec, config, fake=False, target="cpu", profile=True)
        started = time.perf_counter()
        prediction = simulate(spec, config, model_name=model, target="cpu")
        rows.append({
            "source": "CPU real run (same counter, real tensors)", "model": model, "step": stage, "setup": setup,
            "shape": f"B={batch},T={seq_len} fp32", "code": "HEAD", "measured_bytes": real.peak.total,
            "predicted_bytes": prediction.peak_bytes, "error": f"{prediction.peak_bytes / real.peak.total - 1:+.4f}",
            "predicted_reserved_bytes": "", "profiler_bytes": real.profiler_peak, "method": prediction.method,
            "seconds": round(time.perf_counter() - started, 1),
        })
        print(f"  {model} {stage} {setup}: real {real.peak.total} predicted {prediction.peak_bytes} "
              f"({rows[-1]['error']})", flush=True)
    return rows


def write(rows: list[dict], path: Path = OUT_CSV) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-rows", action="store_true", help="only the H200 rows")
    parser.add_argument("--cpu-rows", action="store_true", help="only the CPU rows")
    parser.add_argument("--worker-e2e", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--legacy-upcast", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_e2e:
        print(json.dumps(worker_e2e(args.legacy_upcast)))
        return 0
    rows = []
    if not args.cpu_rows:
        rows += gpu_rows()
    if not args.gpu_rows:
        rows += cpu_rows()
    if OUT_CSV.exists() and (args.gpu_rows or args.cpu_rows):  # keep the half not re-run
        with open(OUT_CSV) as f:
            kept = [r for r in csv.DictReader(f) if r["source"].startswith("CPU") == args.gpu_rows]
        rows = kept + rows if args.cpu_rows else rows + kept
    write(rows)
    for row in rows:
        print(",".join(str(row.get(k, "")) for k in FIELDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
