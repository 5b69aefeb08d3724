"""Does "four roles on one base" hold from 0.5B to 72B? Predicted peak GPU memory of one PPO and one
DPO step, by the memory simulator (`fastrlhf.planner`), for four ways of holding the models.

    python -m benchmarks.memory_headline          # -> results/memory_headline.csv, .png, .md (about 15 min)
    python -m benchmarks.memory_headline --report # tables + plot from the CSV only

Settings (issue 10): PPO, 8 prompts per micro-batch, T = 2048 (1024 prompt + 1024 response); DPO,
8 pairs (16 rows) of T = 2048; bf16 weights, AdamW, activation checkpointing of the trunks that run
with grad; Qwen2.5 0.5B ... 72B configs (`fastrlhf.planner.configs.CATALOG`). Setups
(`fastrlhf.planner.steps`): fastrlhf shared-LoRA roles (r=16, every linear layer), fastrlhf full
fine-tuning (--no-lora), TRL-style separate full models, TRL + peft. "policy alone" is the SFT step
of the policy role with the same LoRA, batch, length and checkpointing: the baseline of the target
"four roles <= 1.25 x the policy alone". A model "fits" a GPU of G GiB when the predicted reserved
memory plus 1 GiB (CUDA context, workspaces) is at most G; 8x80 GiB: FSDP over 8 GPUs (parameters,
gradients, optimizer state and the optimizer step's temporaries sharded).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "memory_headline.csv"
PNG_PATH = RESULTS / "memory_headline.png"
MD_PATH = RESULTS / "memory_headline.md"
GIB = 2**30
GPUS = ((24, 1), (80, 1), (141, 1), (80, 8))
SETUPS = ("shared-lora", "full", "separate", "trl-peft")
SETUP_NAMES = {"shared-lora": "fastrlhf shared-LoRA roles", "full": "fastrlhf full fine-tune",
               "separate": "TRL-style separate models", "trl-peft": "TRL + peft",
               "policy-alone": "policy alone (SFT, LoRA)"}
FIELDS = ("stage", "model", "parameters", "setup", "batch", "seq_len", "checkpointing", "peak_bytes",
          "reserved_bytes", "fsdp8_bytes", "dominant", "by_category", "by_role", "peak_phase", "seconds", "method")


def spec_for(stage: str, setup: str):
    from fastrlhf.planner.steps import StepSpec

    if setup == "policy-alone":
        return StepSpec("sft", setup="shared-lora", batch_size=8, seq_len=2048, checkpointing=True)
    return StepSpec(stage, setup=setup, batch_size=8, seq_len=2048, prompt_len=1024, checkpointing=True)


def run(models, stages=("ppo", "dpo")) -> None:
    from fastrlhf.planner.configs import load_config, parameter_count
    from fastrlhf.planner.simulate import simulate

    done = {(r["stage"], r["model"], r["setup"]) for r in read_rows()}
    jobs = [(stage, model, setup) for model in models for stage in stages for setup in SETUPS]
    jobs += [("ppo", model, "policy-alone") for model in models]
    for stage, model, setup in jobs:
        if (stage, model, setup) in done:
            continue
        config, name = load_config(model)
        spec = spec_for(stage, setup)
        started = time.perf_counter()
        prediction = simulate(spec, config, model_name=name)
        row = {"stage": stage, "model": name, "parameters": parameter_count(config), "setup": setup,
               "batch": spec.batch_size, "seq_len": spec.seq_len, "checkpointing": spec.checkpointing,
               "peak_bytes": prediction.peak_bytes, "reserved_bytes": prediction.reserved_bytes,
               "fsdp8_bytes": prediction.fsdp_peak_bytes(8) + prediction.reserved_bytes - prediction.peak_bytes,
               "dominant": prediction.dominant()[0], "by_category": json.dumps(prediction.by_category()),
               "by_role": json.dumps(prediction.by_role()), "peak_phase": prediction.peak_phase,
               "seconds": round(time.perf_counter() - started, 1), "method": prediction.method}
        append_row(row)
        print(f"{stage} {name} {setup}: {prediction.peak_bytes / GIB:.1f} GiB ({row['seconds']} s)", flush=True)


def read_rows() -> list[dict]:
    if not CSV_PATH.exists():
        return []
    with open(CSV_PATH) as f:
        return list(csv.DictReader(f))


def append_row(row: dict) -> None:
    new = not CSV_PATH.exists()
    with open(CSV_PATH, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def fits(row: dict, gib: int, gpus: int) -> bool:
    need = int(row["reserved_bytes"] if gpus == 1 else row["fsdp8_bytes"])
    return need + GIB <= gib * GIB


def largest_fitting(rows: list[dict], stage: str, setup: str, gib: int, gpus: int) -> dict | None:
    fitting = [r for r in rows if r["stage"] == stage and r["setup"] == setup and fits(r, gib, gpus)]
    return max(fitting, key=lambda r: int(r["parameters"]), default=None)


def report() -> str:
    from fastrlhf.planner.configs import HEADLINE_MODELS

    rows = read_rows()
    order = {m: i for i, m in enumerate(HEADLINE_MODELS)}
    rows.sort(key=lambda r: (r["stage"], order.get(r["model"], 99)))
    lines = ["Predicted peak GPU memory (GiB, allocated; reserved lower bound in the CSV) of one step, "
             "B = 8 (PPO prompts / DPO pairs), T = 2048, bf16, AdamW, activation checkpointing on. "
             "`python -m benchmarks.memory_headline`.", ""]
    by = {(r["stage"], r["model"], r["setup"]): r for r in rows}
    for stage in ("ppo", "dpo"):
        setups = SETUPS + (("policy-alone",) if stage == "ppo" else ())
        lines.append(f"**{stage.upper()}**")
        lines.append("")
        lines.append("| model | " + " | ".join(SETUP_NAMES[s] for s in setups)
                     + (" | shared-LoRA / policy alone |" if stage == "ppo" else " |"))
        lines.append("|---" * (len(setups) + 1 + (stage == "ppo")) + "|")
        for model in HEADLINE_MODELS:
            cells = []
            for setup in setups:
                row = by.get((stage if setup != "policy-alone" else "ppo", model, setup))
                cells.append(f"{int(row['peak_bytes']) / GIB:.1f}" if row else "–")
            ratio = ""
            if stage == "ppo":
                a, b = by.get(("ppo", model, "shared-lora")), by.get(("ppo", model, "policy-alone"))
                ratio = f" | {int(a['peak_bytes']) / int(b['peak_bytes']):.2f}×" if a and b else " | –"
            lines.append(f"| {model} | " + " | ".join(cells) + ratio + " |")
        lines.append("")
        lines.append(f"Largest {stage.upper()} model that fits:")
        lines.append("")
        lines.append("| setup | " + " | ".join(f"{g} GiB" if n == 1 else f"{n}×{g} GiB (FSDP)" for g, n in GPUS) + " |")
        lines.append("|---" * (len(GPUS) + 1) + "|")
        for setup in SETUPS:
            cells = []
            for g, n in GPUS:
                row = largest_fitting(rows, stage, setup, g, n)
                cells.append(row["model"] if row else "none")
            lines.append(f"| {SETUP_NAMES[setup]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, stage in zip(axes, ("ppo", "dpo")):
        for setup in SETUPS + (("policy-alone",) if stage == "ppo" else ()):
            pts = sorted((int(r["parameters"]) / 1e9, int(r["peak_bytes"]) / GIB) for r in rows
                         if r["setup"] == setup and (r["stage"] == stage or setup == "policy-alone"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=SETUP_NAMES[setup],
                        linestyle="--" if setup == "policy-alone" else "-")
        for g in (24, 80, 141):
            ax.axhline(g, color="grey", linewidth=0.8, linestyle=":")
            ax.text(1.0, g, f" {g} GiB", color="grey", fontsize=8, va="center", transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters (billions, Qwen2.5 configs)")
        ax.set_ylabel("predicted peak GPU memory of one step (GiB)")
        ax.set_title(f"{stage.upper()}: B=8, T=2048, bf16, AdamW, checkpointing")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PNG_PATH, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="only tables and plot from the CSV")
    parser.add_argument("--models", default="", help="comma-separated catalog names (default: Qwen2.5 0.5B..72B)")
    args = parser.parse_args(argv)
    from fastrlhf.planner.configs import HEADLINE_MODELS

    if not args.report:
        run([m for m in args.models.split(",") if m] or HEADLINE_MODELS)
    text = report()
    MD_PATH.write_text(text + "\n")
    plot()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
