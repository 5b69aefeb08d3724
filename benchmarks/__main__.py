"""`python -m benchmarks [--quick] [--device cuda|cpu] [--only kernel,...]` runs the suite, writes
`benchmarks/results/<device-slug>.csv`, then regenerates the Markdown tables and plots."""
from __future__ import annotations

import argparse
import os
import sys
import time

# The suite times the torch path on CPU; the Triton interpreter (tests' TRITON_INTERPRET=1) is not
# a performance path. Set before fastrlhf's kernels import.
if os.environ.get("TRITON_INTERPRET") == "1" and "--allow-interpreter" not in sys.argv:
    os.environ.pop("TRITON_INTERPRET")


def main(argv: list[str] | None = None) -> int:
    from benchmarks import cases as cases_mod, device as device_mod, report, runner

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a tiny subset of shapes (CI, smoke tests)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--only", default="", help="comma-separated kernels (or e2e); default all. Known: "
                    + ", ".join(cases_mod.KERNELS) + ", e2e")
    ap.add_argument("--providers", default="", help="comma-separated provider names to run (default all)")
    ap.add_argument("--modes", default="", help="comma-separated subset of forward,backward,full")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop starting new cases after this long; the rest get 'skipped: time budget' rows")
    ap.add_argument("--results-dir", default=None, help="where the CSV/README/plots go (default benchmarks/results)")
    ap.add_argument("--fresh", action="store_true", help="replace this device's CSV instead of merging into it")
    ap.add_argument("--no-report", action="store_true", help="skip regenerating README tables and plots")
    ap.add_argument("--allow-interpreter", action="store_true", help="keep TRITON_INTERPRET=1 (slow; debugging only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch

    info = device_mod.detect(args.device)
    if args.threads or info.device == "cpu":
        # One thread by default on CPU: on a shared machine two OpenMP threads waiting for each other
        # turned 0.1 ms ops into 20 ms ones; single-threaded numbers are slower but stable.
        torch.set_num_threads(args.threads or 1)
        info = device_mod.detect(args.device)
    wanted = [k.strip() for k in args.only.split(",") if k.strip()] or list(cases_mod.KERNELS) + ["e2e"]
    unknown = [k for k in wanted if k not in cases_mod.KERNELS and k != "e2e"]
    if unknown:
        ap.error(f"unknown kernel(s) {unknown}; known: {', '.join(cases_mod.KERNELS)}, e2e")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] or None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or None
    results_dir = args.results_dir or runner.RESULTS_DIR
    path = runner.csv_path(info, results_dir)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None

    runner.log(f"device: {info.name}  ->  {path}")
    runner.log(f"versions: {info.versions}")
    sweeps = [cases_mod.sweep(k, info.device, args.quick) for k in wanted if k != "e2e"]
    # Round-robin over kernels (first shape of every kernel, then the second, ...), so a time budget
    # cuts the big shapes at the end rather than whole kernels.
    cases = [s[i] for i in range(max(map(len, sweeps), default=0)) for s in sweeps if i < len(s)]
    started = time.monotonic()
    # Keep two minutes of the budget for the end-to-end steps (12 rows: 2 steps x 3 providers x with
    # and without activation checkpointing; ~5-8 s each on an H200, models built included).
    kernel_deadline = deadline - 120 if deadline is not None and "e2e" in wanted else deadline
    runner.run_all(cases, info, path, quick=args.quick, fresh=args.fresh, deadline=kernel_deadline,
                   providers=providers, modes=modes)
    if "e2e" in wanted:
        from benchmarks import e2e

        e2e_rows = e2e.run(info, quick=args.quick, deadline=deadline, providers=providers)
        runner.write_rows(path, e2e_rows, fresh=args.fresh and not cases)
    runner.log(f"done in {time.monotonic() - started:.0f} s -> {path}")
    if not args.no_report:
        report.main(["--results-dir", str(results_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
