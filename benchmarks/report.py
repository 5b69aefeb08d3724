"""CSV -> Markdown tables and PNG plots, and the issue-14 targets table.

    python -m benchmarks.report                         # print the summary of the committed CSVs (writes nothing)
    python -m benchmarks.report --update-readme         # regenerate results/README.md, the plots and the
                                                        # README's benchmark section from the committed CSVs
    python -m benchmarks.report --merge DIR_OR_CSV ...  # merge a device run's CSVs into the committed ones first
    python -m benchmarks.report --results-dir DIR       # tables + plots of the CSVs in DIR, written into DIR

Nothing in the checkout changes without `--update-readme` (or `--merge`, which changes the CSVs).
`<results>/README.md` holds, per device, a summary table per kernel and every measured row;
`<results>/<device-slug>__<kernel>.png` time and memory vs the swept size. The README's text between
`<!-- bench:start -->` and `<!-- bench:end -->` is the short summary plus the targets table.

Ratios are fastrlhf / best alternative measured in the same run (same shape, dtype, mode):
below 1 fastrlhf is faster / smaller, above 1 it loses, and the table says so.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.results_csv import KEY

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
OURS = "fastrlhf"


def is_ours(provider: str) -> bool:
    """fastrlhf's own rows: "fastrlhf" for kernels, "fastrlhf-shared-lora" for the end-to-end steps."""
    return provider == OURS or provider.startswith(OURS + "-")


def _float(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def load(results_dir: Path) -> dict[str, list[dict]]:
    """{csv stem (device slug): rows} of the benchmark-result CSVs (their header starts with
    results_csv.KEY columns); other CSVs beside them (the memory planner's tables) are skipped."""
    out = {}
    for path in sorted(Path(results_dir).glob("*.csv")):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not set(KEY) <= set(reader.fieldnames or ()):
                continue
            out[path.stem] = list(reader)
    return out


def human_bytes(n) -> str:
    n = _float(n)
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_ms(x) -> str:
    v = _float(x)
    if v is None:
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "–"
    text = f"{r:.2f}×"
    return f"**{text}**" if r > 1.05 else text  # bold where we lose


def _shape_key(shape: str) -> tuple:
    """Sort shapes numerically ("N=4096,V=32000" before "N=16384,V=32000")."""
    parts = []
    for item in shape.split(","):
        k, _, v = item.partition("=")
        parts.append((k, int(v) if v.isdigit() else v))
    return tuple(parts)


MODE_ORDER = {"full": 0, "forward": 1, "backward": 2}


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (kernel, shape, dtype, mode, fastrlhf provider) with a fastrlhf measurement,
    compared with the other providers' rows of the group (never with another fastrlhf variant)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["shape"], r["dtype"], r["mode"])].append(r)
    out = []
    for (kernel, shape, dtype, mode), rs in groups.items():
        for ours in [r for r in rs if is_ours(r["provider"]) and r.get("status") == "ok"]:
            out.append(_compare(kernel, shape, dtype, mode, ours, rs))
    out.sort(key=lambda e: (e["kernel"], _shape_key(e["shape"]), e["dtype"], MODE_ORDER.get(e["mode"], 9),
                            e["ours"]["provider"]))
    return out


def _compare(kernel, shape, dtype, mode, ours, rs) -> dict:
    alts = [r for r in rs if not is_ours(r["provider"]) and r.get("status") == "ok" and _float(r["median_ms"])]
    alts = [r for r in alts if not r["provider"].startswith(("torch-matmul", "torch-copy"))]
    if ours.get("backend") == "torch":
        # fastrlhf's torch path IS the PyTorch reference (same function): comparing the two would only
        # measure noise, so on that path the reference is not counted as an alternative.
        alts = [r for r in alts if r["provider"] != "torch-reference"]
    t_ours = _float(ours["median_ms"])
    best_t = min(alts, key=lambda r: _float(r["median_ms"]), default=None)
    mem_alts = [r for r in alts if _float(r.get("peak_bytes")) is not None]
    best_m = min(mem_alts, key=lambda r: _float(r["peak_bytes"]), default=None)
    m_ours = _float(ours.get("peak_bytes"))
    t_ratio = t_ours / _float(best_t["median_ms"]) if best_t and t_ours else None
    m_ratio = None
    if best_m and m_ours is not None:
        denom = _float(best_m["peak_bytes"])
        m_ratio = (m_ours / denom) if denom else (1.0 if m_ours == 0 else None)
    missing = sorted({r["provider"] for r in rs if r.get("status") not in ("ok", None, "")})
    return dict(kernel=kernel, shape=shape, dtype=dtype, mode=mode, ours=ours, best_t=best_t, best_m=best_m,
                t_ratio=t_ratio, m_ratio=m_ratio, missing=missing, backend=ours.get("backend", ""))


def label(e: dict) -> str:
    """The kernel, with the fastrlhf variant when it is not plain "fastrlhf" (the e2e rows)."""
    provider = e["ours"]["provider"]
    return e["kernel"] if provider == OURS else f"{e['kernel']} ({provider})"


def ceilings(rows: list[dict]) -> dict[str, dict]:
    """{"gemm": row, "copy": row} of the device's measured ceilings (benchmarks.cases.ceiling_cases)."""
    return {r["kernel"].split(":", 1)[1]: r for r in rows
            if r["kernel"].startswith("ceiling:") and r.get("status") == "ok" and _float(r.get("achieved"))}


def device_header(rows: list[dict]) -> str:
    r = rows[0]
    dates = sorted({x.get("date", "")[:10] for x in rows if x.get("date")})
    versions = ", ".join(f"{k} {r[k]}" for k in ("torch", "triton", "fastrlhf", "liger_kernel", "trl") if r.get(k))
    head = f"**{r.get('device', '?')}** — {versions}; measured {', '.join(dates)}"
    found = ceilings(rows)
    if found:
        parts = [f"{c['dtype']} GEMM {float(c['achieved']):.0f} TFLOP/s ({c['pct_of_peak']}% of the spec sheet)"
                 if name == "gemm" else f"copy {float(c['achieved']):.0f} GB/s ({c['pct_of_peak']}% of the spec sheet)"
                 for name, c in sorted(found.items(), reverse=True)]
        head += "; measured ceilings: " + ", ".join(parts)
    return head


def _achieved(row: dict) -> str:
    return f"{float(row['achieved']):.3g} {row['achieved_unit']}" if _float(row.get("achieved")) else "–"


def summary_table(entries: list[dict], *, with_pct: bool) -> list[str]:
    head = ["kernel", "shape", "dtype", "mode", "fastrlhf ms", "best alternative", "time ratio",
            "fastrlhf peak", "least-memory alternative", "memory ratio"]
    if with_pct:
        head += ["achieved", "% of peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        o = e["ours"]
        bt = f"{e['best_t']['provider']} {fmt_ms(e['best_t']['median_ms'])} ms" if e["best_t"] else "–"
        bm = f"{e['best_m']['provider']} {human_bytes(e['best_m']['peak_bytes'])}" if e["best_m"] else "–"
        cells = [label(e), e["shape"], e["dtype"], e["mode"], fmt_ms(o["median_ms"]), bt, fmt_ratio(e["t_ratio"]),
                 human_bytes(o.get("peak_bytes")), bm, fmt_ratio(e["m_ratio"]) if o.get("peak_bytes") else "–"]
        if with_pct:
            cells += [_achieved(o), f"{o['pct_of_peak']}%" if o.get("pct_of_peak") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def detail_table(rows: list[dict]) -> list[str]:
    head = ["kernel", "shape", "dtype", "mode", "provider", "backend", "median ms", "p20–p80 ms", "peak",
            "achieved", "% peak", "max |Δ| vs ref", "status", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(rows, key=lambda r: (r["kernel"], _shape_key(r["shape"]), r["dtype"],
                                       MODE_ORDER.get(r["mode"], 9), not is_ours(r["provider"]), r["provider"]))
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append("| " + " | ".join([
            r["kernel"], r["shape"], r["dtype"], r["mode"], r["provider"], r.get("backend", ""),
            fmt_ms(r["median_ms"]) if ok else "–",
            f"{fmt_ms(r['p20_ms'])}–{fmt_ms(r['p80_ms'])}" if ok else "–",
            _peak_cell(r) if ok and r.get("peak_bytes") else "–",
            _achieved(r) if ok else "–",
            r.get("pct_of_peak") or "–", r.get("max_abs_diff") or "–",
            r.get("status", "").replace("|", "/"), _provider_note(r).replace("|", "/"),
        ]) + " |")
    return lines


def _provider_note(row: dict) -> str:
    """The provider's own part of a row's note ("path: ...", written by benchmarks.runner): which
    path a peer took, a fallback included. The case's part is the same on every row of the case."""
    note = row.get("note") or ""
    return "; ".join(p[len("path: "):] for p in note.split("; ") if p.startswith("path: "))


def static_bytes(row: dict) -> float | None:
    """The e2e rows' weights + gradients + optimizer bytes, kept in the note ("static_bytes=N; ...")
    because the CSV schema has no column for it."""
    m = re.search(r"static_bytes=(\d+)", row.get("note") or "")
    return float(m.group(1)) if m else None


def _peak_cell(row: dict) -> str:
    static = static_bytes(row)
    peak = human_bytes(row.get("peak_bytes"))
    return f"{peak} (static {human_bytes(static)})" if static is not None else peak


def _is_gpu(rows):
    return any(r.get("pct_of_peak") for r in rows)


def losses(entries: list[dict]) -> list[str]:
    out = []
    for e in entries:
        if e["t_ratio"] and e["t_ratio"] > 1.05:
            out.append(f"- {label(e)} {e['shape']} {e['dtype']} {e['mode']}: {e['t_ratio']:.2f}× the time of "
                       f"{e['best_t']['provider']}")
        if e["m_ratio"] and e["m_ratio"] > 1.05:
            out.append(f"- {label(e)} {e['shape']} {e['dtype']} {e['mode']}: {e['m_ratio']:.2f}× the memory of "
                       f"{e['best_m']['provider']}")
    return out


def results_readme(data: dict[str, list[dict]], plots: dict[str, list[str]]) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.report --update-readme` from the CSVs in this folder — do not "
             "edit by hand. Ratios are fastrlhf / the best alternative measured in the same run on the same shape, "
             "dtype and mode: < 1 means fastrlhf is faster (smaller), **bold > 1 means it loses**. Peak memory is "
             "the extra memory the call allocates beyond its inputs (see benchmarks/measure.py). \"achieved\" is "
             "the FLOPs (LM-head rows: the GEMMs that provider's algorithm executes) or bytes of the call over its "
             "median time; % of peak is against the spec sheet (benchmarks/device.py), the measured ceilings are in "
             "each device's header. CPU rows time fastrlhf's torch path (`backend` column) on one thread of a shared "
             "machine: they are noisy and say nothing about GPU speed; there the torch path is the PyTorch "
             "reference itself, so the reference is left out of the alternatives.", ""]
    for slug, rows in data.items():
        if not rows:
            continue
        entries = summarise(rows)
        lines += [f"## {slug}", "", device_header(rows), ""]
        lines += summary_table(entries, with_pct=_is_gpu(rows)) + [""]
        lost = losses(entries)
        if lost:
            lines += ["Where fastrlhf loses in this run:", ""] + lost + [""]
        for png in plots.get(slug, []):
            lines.append(f"![{png}]({png})")
        lines += ["", "<details><summary>Every row</summary>", ""] + detail_table(rows) + ["", "</details>", ""]
    lines += targets_section(data)
    return "\n".join(lines) + "\n"


def _size(e) -> int:
    return math.prod(v for _, v in _shape_key(e["shape"]) if isinstance(v, int))


def pick(entries, kernel, provider=OURS):
    """The representative entry of a kernel (and fastrlhf variant) for the short summary: the largest
    shape, full mode (forward for forward-only kernels); for the e2e steps the checkpointed configuration."""
    es = [e for e in entries if e["kernel"] == kernel and e["ours"]["provider"] == provider]
    if not es:
        return None
    # Ties: bf16, then the activation-checkpointed e2e configuration (how PPO is run for real).
    largest = max(es, key=lambda e: (_size(e), e["dtype"] == "bf16", e["shape"].endswith(",ckpt")))
    same = [e for e in es if e["shape"] == largest["shape"] and e["dtype"] == largest["dtype"]]
    return min(same, key=lambda e: MODE_ORDER.get(e["mode"], 9))


def readme_block(data: dict[str, list[dict]]) -> str:
    lines = ["Generated from the committed CSVs by `python -m benchmarks.report --update-readme` (full tables, every "
             "provider and plots: [benchmarks/results/README.md](benchmarks/results/README.md)). Ratio = fastrlhf / "
             "best alternative (PyTorch eager, torch.compile, Liger-Kernel, TRL, OpenRLHF/verl code) on the largest "
             "shape measured; below 1 is better, **bold** means fastrlhf loses. Achieved: FLOPs (the GEMMs fastrlhf "
             "executes: 6·N·V·H fwd+bwd for the fused heads, 8·N·V·H for `token_logprobs`) or bytes over the median "
             "time; % of the spec-sheet peak.", ""]
    for slug, rows in data.items():
        entries = summarise(rows)
        if not entries:
            continue
        gpu = _is_gpu(rows)
        lines += [device_header(rows), ""]
        head = ["kernel", "shape", "mode", "fastrlhf ms", "time ratio (vs)", "memory ratio (vs)"]
        head += ["achieved", "% of peak"] if gpu else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for kernel, provider in sorted({(e["kernel"], e["ours"]["provider"]) for e in entries}):
            e = pick(entries, kernel, provider)
            t = f"{fmt_ratio(e['t_ratio'])} ({e['best_t']['provider']})" if e["best_t"] else "–"
            m = f"{fmt_ratio(e['m_ratio'])} ({e['best_m']['provider']})" if e["best_m"] and e["m_ratio"] else "–"
            cells = [label(e), f"{e['shape']} {e['dtype']}", e["mode"], fmt_ms(e["ours"]["median_ms"]), t, m]
            if gpu:
                cells += [_achieved(e["ours"]),
                          f"{e['ours']['pct_of_peak']}%" if e["ours"].get("pct_of_peak") else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(lines) == 2:
        lines += ["(no measurements yet)", ""]
    lines += targets_section(data)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- issue 14's targets


@dataclass(frozen=True)
class Target:
    """One target of issue 14, checked against the GPU rows (H100/H200, bf16 unless said)."""
    what: str                       # as the issue words it
    kernel: str
    shape: str | None               # the exact shape, or None: the smallest measured shape >= min_elements
    ours: tuple[str, ...] = (OURS,)  # fastrlhf providers the target applies to
    time: tuple[float, tuple[str, ...]] | None = None    # (max ratio, peers: the fastest of them; () = any)
    memory: tuple[float, tuple[str, ...]] | None = None  # (max ratio, peers: the smallest of them)
    pct: float | None = None        # minimum % of the bf16 spec-sheet peak
    min_elements: int = 0


HEAD = "V=151936,H=4096"
SMALL_LOSSES = ("value_loss", "whiten", "group_advantages", "dpo_loss(sigmoid)", "reward_loss(bradley-terry)",
                "kl_penalty(k3)")
POLICY_PEERS = ("trl-fused-head+compiled-loss", "liger-cute-head+compiled-loss", "liger-fused-linear-grpo")
DPO_PEERS = ("trl-full-logits", "trl-fused-head", "liger-chunked-dpo")
SHARED_LORA = ("fastrlhf-shared-lora-fused", "fastrlhf-shared-lora")
TARGETS = (
    Target("policy_loss_from_hidden fwd+bwd vs the best peer pipeline", "policy_loss_from_hidden",
           f"B=16,T=1024,{HEAD}", time=(0.85, POLICY_PEERS), memory=(1.0, ("liger-fused-linear-grpo",)), pct=65),
    Target("token_logprobs fwd+bwd (weight trains)", "token_logprobs", f"N=16384,{HEAD}",
           time=(1.15, ("trl-full-logits",)), memory=(1.0, ("liger-flce",)), pct=75),
    Target("grpo_from_logits", "grpo_from_logits", "B=16,L=1024,V=151936", time=(1.0, ("liger-grpo",)),
           memory=(1.0, ("liger-grpo",))),
    Target("dpo_from_hidden", "dpo_from_hidden", "pairs=4,T=1024,V=151936,H=2048", time=(1.0, DPO_PEERS),
           memory=(0.6, ("liger-chunked-dpo",))),
    Target("dpo_from_hidden's target, on the fused DPO head", "dpo_loss_from_hidden",
           "pairs=4,T=1024,V=151936,H=2048", time=(1.0, DPO_PEERS), memory=(0.6, ("liger-chunked-dpo",))),
    *(Target(f"small loss at B×T ≥ 64k: {k}", k, None, time=(1.0, ("torch-compile",)), min_elements=65536)
      for k in SMALL_LOSSES),
    Target("e2e PPO step, Qwen2-0.5B shape, checkpointing on: shared-LoRA vs separate models", "e2e_ppo_step",
           "model=qwen2-0.5b,B=8,T=1024,ckpt", ours=SHARED_LORA,
           time=(1.0, ("separate-models-fused", "trl-style")), memory=(0.5, ("separate-models-fused", "trl-style"))),
)


def _elements(shape: str) -> int:
    dims = dict(_shape_key(shape))
    return int(dims.get("B", 1)) * int(dims.get("T", 1)) if "B" in dims else _size({"shape": shape})


def _target_rows(target: Target, rows: list[dict]) -> list[tuple[str, dict, list[dict]]]:
    """(fastrlhf provider, its ok row, the group's rows) at the target's shape, full mode (forward
    for forward-only kernels), for each fastrlhf provider measured."""
    group = [r for r in rows if r["kernel"] == target.kernel]
    if target.shape is None:
        shapes = sorted({r["shape"] for r in group if is_ours(r["provider"]) and r.get("status") == "ok"
                         and _elements(r["shape"]) >= target.min_elements}, key=_elements)
        group = [r for r in group if shapes and r["shape"] == shapes[0]]
    else:
        group = [r for r in group if r["shape"] == target.shape]
    modes = {r["mode"] for r in group}
    mode = "full" if "full" in modes else "forward"
    group = [r for r in group if r["mode"] == mode]
    return [(p, r, group) for p in target.ours for r in group if r["provider"] == p and r.get("status") == "ok"]


def _check(target: Target, ours: dict, group: list[dict]) -> tuple[list[str], list[str], bool]:
    """(measured parts, verdict parts, complete) of one fastrlhf row against the target."""
    measured, verdict, complete = [], [], True
    for kind, spec, column in (("time", target.time, "median_ms"), ("memory", target.memory, "peak_bytes")):
        if spec is None:
            continue
        limit, names = spec
        peers = [r for r in group if r.get("status") == "ok" and _float(r.get(column))
                 and (r["provider"] in names if names else not is_ours(r["provider"]))]
        if not peers or not _float(ours.get(column)):
            measured.append(f"{kind}: no {' / '.join(names) or 'peer'} row")
            complete = False
            continue
        best = min(peers, key=lambda r: _float(r[column]))
        ratio = _float(ours[column]) / _float(best[column])
        measured.append(f"{kind} {ratio:.2f}× {best['provider']}")
        verdict.append("met" if ratio <= limit else "missed")
    if target.pct is not None:
        pct = _float(ours.get("pct_of_peak"))
        if pct is None:
            complete = False
        else:
            measured.append(f"{pct:.0f}% of peak")
            verdict.append("met" if pct >= target.pct else "missed")
    return measured, verdict, complete


def _criterion(target: Target) -> str:
    parts = []
    if target.time:
        parts.append(f"time ≤ {target.time[0]:g}× {' / '.join(target.time[1])}")
    if target.memory:
        parts.append(f"memory ≤ {target.memory[0]:g}× {' / '.join(target.memory[1])}")
    if target.pct:
        parts.append(f"≥ {target.pct:g}% of bf16 peak")
    shape = target.shape or f"smallest measured shape with ≥ {target.min_elements} elements"
    return f"{shape}: " + ", ".join(parts)


def targets_section(data: dict[str, list[dict]]) -> list[str]:
    """Issue 14's targets against the GPU CSVs: measured ratios where the rows exist, "not measured
    yet" where they do not (nothing is estimated)."""
    gpu = {slug: rows for slug, rows in data.items() if not slug.startswith("cpu")}
    lines = ["**Targets of issue 14** (GPU rows only; fastrlhf ÷ peer, medians of one run). A verdict is about the "
             "code as it was on the row's date: rows older than a change to the kernel they time say nothing about "
             "the change.", "",
             "| target | criterion | measured | verdict |", "|---|---|---|---|"]
    for target in TARGETS:
        found = False
        for slug, rows in gpu.items():
            for provider, ours, group in _target_rows(target, rows):
                found = True
                measured, verdict, complete = _check(target, ours, group)
                who = "" if provider == OURS else f" [{provider}]"
                when = f"{rows[0].get('device', slug)}, {ours.get('date', '')[:10]}"
                status = ("missed" if "missed" in verdict else "met") if verdict else "not measured yet"
                if verdict and not complete:
                    status += " (partly measured)"
                lines.append(f"| {target.what}{who} | {_criterion(target)} | {'; '.join(measured)} ({when}) | "
                             f"{status} |")
        if not found:
            lines.append(f"| {target.what} | {_criterion(target)} | – | not measured yet |")
    return lines + [""]


def _sweep_axis(shapes: list[str]) -> str | None:
    keys = defaultdict(set)
    for s in shapes:
        for k, v in _shape_key(s):
            keys[k].add(v)
    varying = [k for k, vs in keys.items() if len(vs) > 1 and all(isinstance(v, int) for v in vs)]
    for preferred in ("N", "T", "B", "pairs"):
        if preferred in varying:
            return preferred
    return varying[0] if varying else None


def plot(data: dict[str, list[dict]], results_dir: Path) -> dict[str, list[str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return {}
    made = defaultdict(list)
    for slug, rows in data.items():
        ok = [r for r in rows if r.get("status") == "ok" and _float(r["median_ms"])]
        by_kernel = defaultdict(list)
        for r in ok:
            by_kernel[r["kernel"]].append(r)
        for kernel, rs in sorted(by_kernel.items()):
            mode = "full" if any(r["mode"] == "full" for r in rs) else "forward"
            dtype = "bf16" if any(r["dtype"] == "bf16" and r["mode"] == mode for r in rs) else rs[0]["dtype"]
            rs = [r for r in rs if r["mode"] == mode and r["dtype"] == dtype]
            axis = _sweep_axis([r["shape"] for r in rs])
            if axis is None:
                continue
            # Hold the other dimensions at their most common setting.
            def rest(r):
                return tuple((k, v) for k, v in _shape_key(r["shape"]) if k != axis)
            counts = defaultdict(int)
            for r in rs:
                counts[rest(r)] += 1
            fixed = max(counts, key=counts.get)
            rs = [r for r in rs if rest(r) == fixed]
            series = defaultdict(list)
            for r in rs:
                series[r["provider"]].append((dict(_shape_key(r["shape"]))[axis], _float(r["median_ms"]),
                                              _float(r.get("peak_bytes"))))
            if len({x for pts in series.values() for x, _, _ in pts}) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for provider, pts in sorted(series.items(), key=lambda kv: not is_ours(kv[0])):
                pts.sort()
                style = dict(linewidth=2.5, marker="o") if is_ours(provider) else dict(linewidth=1.2, marker=".")
                ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=provider, **style)
                mem = [(p[0], p[2]) for p in pts if p[2] is not None]
                if mem:
                    ax_m.plot([p[0] for p in mem], [max(p[1], 1) / 2**20 for p in mem], label=provider, **style)
            fixed_txt = ",".join(f"{k}={v}" for k, v in fixed)
            for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_t.set_title(f"{kernel} {mode} {dtype} {fixed_txt}", fontsize=9)
            ax_m.set_title(rows[0].get("device", slug), fontsize=9)
            ax_m.legend(fontsize=7)
            fig.tight_layout()
            name = f"{slug}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', kernel)}.png"
            fig.savefig(Path(results_dir) / name, dpi=90)
            plt.close(fig)
            made[slug].append(name)
    return made


def update_readme(readme: Path, block: str) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{block}{END}{tail}")
    return True


def merge_runs(sources: list[str], results_dir: Path) -> list[Path]:
    """Merge the CSVs of a device run (files, or folders holding them) into results_dir/<same name>.csv
    (a time-budget "skipped" row never replaces a measured one)."""
    from benchmarks.results_csv import read_rows, write_rows

    written = []
    for source in sources:
        source = Path(source)
        files = sorted(source.glob("*.csv")) if source.is_dir() else [source]
        if not files:
            raise SystemExit(f"--merge: no CSV in {source}")
        for f in files:
            target = results_dir / f.name
            write_rows(target, read_rows(f))
            written.append(target)
            print(f"merged {f} -> {target}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default=str(RESULTS_DIR),
                    help="the CSVs to report on (default: the committed benchmarks/results)")
    ap.add_argument("--update-readme", action="store_true",
                    help="write <results-dir>/README.md, the plots and the bench section of --readme")
    ap.add_argument("--readme", default=str(README), help="file with the bench:start/end markers (--update-readme)")
    ap.add_argument("--merge", nargs="+", default=[], metavar="CSV_OR_DIR",
                    help="merge these CSVs (a device run's) into <results-dir> first")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--print-only", action="store_true", help="print the summary and targets; write nothing")
    args = ap.parse_args(argv)
    if args.print_only and (args.update_readme or args.merge):
        ap.error("--print-only writes nothing: it excludes --update-readme and --merge")
    results_dir = Path(args.results_dir)
    if args.merge:
        merge_runs(args.merge, results_dir)
    data = load(results_dir)
    block = readme_block(data)
    committed = results_dir.resolve() == RESULTS_DIR.resolve()
    if args.update_readme or not (committed or args.print_only):
        # Another folder is the caller's own output: its tables and plots go there. The committed
        # tables change only on request.
        plots = {} if args.no_plots else plot(data, results_dir)
        (results_dir / "README.md").write_text(results_readme(data, plots))
        print(f"wrote {results_dir / 'README.md'} and {sum(len(v) for v in plots.values())} plots", file=sys.stderr)
    if args.update_readme:
        readme = Path(args.readme)
        if not (readme.exists() and update_readme(readme, block)):
            raise SystemExit(f"{readme} has no {START} … {END} markers")
        print(f"updated the bench section of {readme}", file=sys.stderr)
    else:
        print(block)
        if committed and not args.print_only:
            print("(printed only: `--update-readme` regenerates benchmarks/results/README.md, the plots and the "
                  "README's bench section from these CSVs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
