"""CSV -> Markdown tables and PNG plots.

    python -m benchmarks.report [--results-dir DIR] [--readme README.md]

Writes `<results>/README.md` (per device: a summary table per kernel and every measured row) and
`<results>/<device-slug>__<kernel>.png` (time and peak memory vs the swept size, per provider).
If `--readme` points at a file holding the markers `<!-- bench:start -->` and `<!-- bench:end -->`,
the text between them is replaced by the short summary; otherwise the summary is printed.

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
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
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
    """{csv stem (device slug): rows}"""
    out = {}
    for path in sorted(Path(results_dir).glob("*.csv")):
        with open(path, newline="") as f:
            out[path.stem] = list(csv.DictReader(f))
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
    """One entry per (kernel, shape, dtype, mode) that has a fastrlhf measurement."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["shape"], r["dtype"], r["mode"])].append(r)
    out = []
    for (kernel, shape, dtype, mode), rs in groups.items():
        ours = [r for r in rs if is_ours(r["provider"]) and r.get("status") == "ok"]
        if not ours:
            continue
        ours = ours[0]
        alts = [r for r in rs if not is_ours(r["provider"]) and r.get("status") == "ok" and _float(r["median_ms"])]
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
        out.append(dict(kernel=kernel, shape=shape, dtype=dtype, mode=mode, ours=ours, best_t=best_t,
                        best_m=best_m, t_ratio=t_ratio, m_ratio=m_ratio, missing=missing,
                        backend=ours.get("backend", "")))
    out.sort(key=lambda e: (e["kernel"], _shape_key(e["shape"]), e["dtype"], MODE_ORDER.get(e["mode"], 9)))
    return out


def device_header(rows: list[dict]) -> str:
    r = rows[0]
    dates = sorted({x.get("date", "")[:10] for x in rows if x.get("date")})
    versions = ", ".join(f"{k} {r[k]}" for k in ("torch", "triton", "fastrlhf", "liger_kernel", "trl") if r.get(k))
    return f"**{r.get('device', '?')}** — {versions}; measured {', '.join(dates)}"


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
        cells = [e["kernel"], e["shape"], e["dtype"], e["mode"], fmt_ms(o["median_ms"]), bt, fmt_ratio(e["t_ratio"]),
                 human_bytes(o.get("peak_bytes")), bm, fmt_ratio(e["m_ratio"]) if o.get("peak_bytes") else "–"]
        if with_pct:
            ach = f"{float(o['achieved']):.3g} {o['achieved_unit']}" if _float(o.get("achieved")) else "–"
            cells += [ach, f"{o['pct_of_peak']}%" if o.get("pct_of_peak") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def detail_table(rows: list[dict]) -> list[str]:
    head = ["kernel", "shape", "dtype", "mode", "provider", "backend", "median ms", "p20–p80 ms", "peak",
            "achieved", "% peak", "max |Δ| vs ref", "status"]
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
            f"{float(r['achieved']):.3g} {r['achieved_unit']}" if ok and _float(r.get("achieved")) else "–",
            r.get("pct_of_peak") or "–", r.get("max_abs_diff") or "–",
            r.get("status", "").replace("|", "/"),
        ]) + " |")
    return lines


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
            out.append(f"- {e['kernel']} {e['shape']} {e['dtype']} {e['mode']}: {e['t_ratio']:.2f}× the time of "
                       f"{e['best_t']['provider']}")
        if e["m_ratio"] and e["m_ratio"] > 1.05:
            out.append(f"- {e['kernel']} {e['shape']} {e['dtype']} {e['mode']}: {e['m_ratio']:.2f}× the memory of "
                       f"{e['best_m']['provider']}")
    return out


def results_readme(data: dict[str, list[dict]], plots: dict[str, list[str]]) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.report` from the CSVs in this folder — do not edit by hand.",
             "Ratios are fastrlhf / the best alternative measured in the same run on the same shape, dtype "
             "and mode: < 1 means fastrlhf is faster (smaller), **bold > 1 means it loses**. Peak memory is the "
             "extra memory the call allocates beyond its inputs (see benchmarks/measure.py). CPU rows time "
             "fastrlhf's torch path (`backend` column) on one thread of a shared machine: they are noisy and say "
             "nothing about GPU speed; there the torch path is the PyTorch reference itself, so the reference "
             "is left out of the alternatives.", ""]
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
    return "\n".join(lines) + "\n"


def pick(entries, kernel):
    """The representative entry of a kernel for the short summary: the largest shape, full mode
    (forward for forward-only kernels); for the e2e steps the checkpointed configuration."""
    es = [e for e in entries if e["kernel"] == kernel]
    if not es:
        return None
    def size(e):
        return math.prod(v for _, v in _shape_key(e["shape"]) if isinstance(v, int))
    # Ties: bf16, then the activation-checkpointed e2e configuration (how PPO is run for real).
    largest = max(es, key=lambda e: (size(e), e["dtype"] == "bf16", e["shape"].endswith(",ckpt")))
    same = [e for e in es if e["shape"] == largest["shape"] and e["dtype"] == largest["dtype"]]
    return min(same, key=lambda e: MODE_ORDER.get(e["mode"], 9))


def readme_block(data: dict[str, list[dict]]) -> str:
    lines = ["Measured by `python -m benchmarks` (full tables, every provider and plots: "
             "[benchmarks/results/README.md](benchmarks/results/README.md)). Ratio = fastrlhf / best alternative "
             "(PyTorch eager, torch.compile, Liger-Kernel, TRL, OpenRLHF/verl code) on the largest shape measured; "
             "below 1 is better, **bold** means fastrlhf loses.", ""]
    for slug, rows in data.items():
        entries = summarise(rows)
        if not entries:
            continue
        gpu = _is_gpu(rows)
        lines += [device_header(rows), ""]
        head = ["kernel", "shape", "mode", "time ratio (vs)", "memory ratio (vs)"] + (["% of peak"] if gpu else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for kernel in sorted({e["kernel"] for e in entries}):
            e = pick(entries, kernel)
            t = f"{fmt_ratio(e['t_ratio'])} ({e['best_t']['provider']})" if e["best_t"] else "–"
            m = f"{fmt_ratio(e['m_ratio'])} ({e['best_m']['provider']})" if e["best_m"] and e["m_ratio"] else "–"
            cells = [kernel, f"{e['shape']} {e['dtype']}", e["mode"], t, m]
            if gpu:
                cells.append(f"{e['ours']['pct_of_peak']}%" if e["ours"].get("pct_of_peak") else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(lines) == 2:
        lines.append("(no measurements yet)")
    return "\n".join(lines).rstrip() + "\n"


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--readme", default=str(Path(__file__).resolve().parent.parent / "README.md"),
                    help="file with bench:start/end markers to rewrite (printed instead if it has none)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    results_dir = Path(args.results_dir)
    data = load(results_dir)
    plots = {} if args.no_plots else plot(data, results_dir)
    (results_dir / "README.md").write_text(results_readme(data, plots))
    block = readme_block(data)
    readme = Path(args.readme)
    if readme.exists() and update_readme(readme, block):
        print(f"updated the bench section of {readme}", file=sys.stderr)
    else:
        print(f"(no {START} … {END} markers in {readme}; paste this block into the README)\n", file=sys.stderr)
        print(block)
    print(f"wrote {results_dir / 'README.md'} and {sum(len(v) for v in plots.values())} plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
