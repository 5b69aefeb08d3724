"""`python -m benchmarks [--quick] [--device cuda|cpu] [--only kernel,...] [--results-dir DIR]` runs the
suite and merges its rows into `DIR/<device-slug>.csv` (default DIR: benchmarks/results).

It writes nothing else in the checkout: the tables and plots of a run go to `--results-dir` when that
is another folder, and are only printed otherwise. The committed tables (benchmarks/results/README.md,
the plots and the README's benchmark section) change only through
`python -m benchmarks.report --update-readme`, which regenerates them from the committed CSVs.

From outside the repository root run the folder itself: `python path/to/fastrlhf/benchmarks ...`
(`python -m benchmarks` needs the repository root as the current directory).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if not __package__:
    # `python path/to/benchmarks`: the folder runs as a script with itself first on sys.path, where its
    # modules (device, report, ...) would shadow same-named top-level ones. Put the repository there instead.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(REPO)
    else:
        sys.path.insert(0, str(REPO))

# The suite times the torch path on CPU; the Triton interpreter (tests' TRITON_INTERPRET=1) is not
# a performance path. Set before fastrlhf's kernels import, and only when this file is the program:
# a test that imports it must not switch the interpreter off for the rest of its session.
if (__name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1"
        and "--allow-interpreter" not in sys.argv):
    os.environ.pop("TRITON_INTERPRET")


def _check_fastrlhf() -> str | None:
    """Why fastrlhf cannot be benchmarked from here, or None. A fastrlhf imported from another
    checkout than this suite's would time the wrong code: say so instead of measuring it."""
    try:
        import fastrlhf
    except ImportError as exc:
        return (f"fastrlhf is not importable ({exc}). Install this checkout first: "
                f"cd {REPO} && pip install -e '.[bench]'")
    where = Path(fastrlhf.__file__).resolve().parent.parent
    if where != REPO and os.environ.get("BENCH_ALLOW_OTHER_FASTRLHF") != "1":
        return (f"this suite is in {REPO} but `import fastrlhf` finds {where}: install this checkout "
                f"(cd {REPO} && pip install -e .) or set BENCH_ALLOW_OTHER_FASTRLHF=1")
    return None


def main(argv: list[str] | None = None) -> int:
    from benchmarks import cases as cases_mod, device as device_mod, report, runner

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny subset of shapes (CI, smoke tests)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--only", default="", help="comma-separated kernels (or e2e); default all. Known: "
                    + ", ".join(cases_mod.KERNELS) + ", e2e")
    ap.add_argument("--exclude", default="", help="comma-separated kernels (or e2e) to leave out")
    ap.add_argument("--headline", action="store_true",
                    help="only the headline rows (issue 14's target shapes, in priority order), fastrlhf against "
                         "the strongest peers only, fwd+bwd only; --providers/--modes override the last two")
    ap.add_argument("--skip-headline", action="store_true", help="every case except the headline ones")
    ap.add_argument("--providers", default="", help="comma-separated provider names to run (default all)")
    ap.add_argument("--modes", default="", help="comma-separated subset of forward,backward,full")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop starting new cases after this long; the rest get 'skipped: time budget' rows")
    ap.add_argument("--results-dir", default=None, help="where the CSV (and, if not the default folder, the tables "
                                                        "and plots) go; default benchmarks/results")
    ap.add_argument("--fresh", action="store_true", help="replace this device's CSV instead of merging into it")
    ap.add_argument("--no-report", action="store_true", help="no tables or plots at the end")
    ap.add_argument("--allow-interpreter", action="store_true", help="keep TRITON_INTERPRET=1 (slow; debugging only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.headline and args.skip_headline:
        ap.error("--headline and --skip-headline exclude each other")
    problem = _check_fastrlhf()
    if problem:
        print(f"python -m benchmarks: {problem}", file=sys.stderr)
        return 2

    import torch

    info = device_mod.detect(args.device)
    if args.threads or info.device == "cpu":
        # One thread by default on CPU: on a shared machine two OpenMP threads waiting for each other
        # turned 0.1 ms ops into 20 ms ones; single-threaded numbers are slower but stable.
        torch.set_num_threads(args.threads or 1)
        info = device_mod.detect(args.device)
    known = list(cases_mod.KERNELS) + ["e2e"]
    excluded = {k.strip() for k in args.exclude.split(",") if k.strip()}
    wanted = [k.strip() for k in args.only.split(",") if k.strip()] or known
    unknown = [k for k in wanted + sorted(excluded) if k not in known]
    if unknown:
        ap.error(f"unknown kernel(s) {unknown}; known: {', '.join(known)}")
    wanted = [k for k in wanted if k not in excluded]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] or None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or None
    results_dir = Path(args.results_dir) if args.results_dir else runner.RESULTS_DIR
    path = runner.csv_path(info, results_dir)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None

    runner.log(f"device: {info.name}  ->  {path}")
    runner.log(f"versions: {info.versions}")
    if args.headline:
        cases = [c for c in cases_mod.headline(info.device) if _family(c.kernel) in wanted]
        if providers is None:
            providers = _headline_selection
        if modes is None:  # fwd+bwd where the case has it (the ceilings are forward-only)
            for c in cases:
                c.modes = ("full",) if "full" in c.modes else c.modes
    else:
        sweeps = [cases_mod.sweep(k, info.device, args.quick) for k in wanted if k != "e2e"]
        if args.skip_headline:
            skip = cases_mod.headline_keys(info.device)
            sweeps = [[c for c in s if (c.kernel, c.shape_str, c.dtype) not in skip] for s in sweeps]
        # Round-robin over kernels (first shape of every kernel, then the second, ...), so a time budget
        # cuts the big shapes at the end rather than whole kernels.
        cases = [s[i] for i in range(max(map(len, sweeps), default=0)) for s in sweeps if i < len(s)]
    started = time.monotonic()
    run_e2e = "e2e" in wanted and not args.headline
    # Keep two minutes of the budget for the end-to-end steps when they share the run.
    kernel_deadline = deadline - 120 if deadline is not None and run_e2e and cases else deadline
    runner.run_all(cases, info, path, quick=args.quick, fresh=args.fresh, deadline=kernel_deadline,
                   providers=providers, modes=modes)
    if run_e2e:
        from benchmarks import e2e

        # Each row is merged into the CSV as soon as it is measured (a killed run keeps the rows it has).
        e2e.run(info, quick=args.quick, deadline=deadline, providers=providers,
                on_row=lambda row: runner.write_rows(path, [row]))
    runner.log(f"done in {time.monotonic() - started:.0f} s -> {path}")
    if not args.no_report:
        report.main(["--results-dir", str(results_dir)])
    return 0


def _family(kernel: str) -> str:
    """The --only name of a case's kernel ("ceiling:gemm" -> "ceilings")."""
    return "ceilings" if kernel.startswith("ceiling:") else kernel


def _headline_selection(provider) -> bool:
    """fastrlhf and the strongest peers (no eager / torch.compile twins); the ceilings' own providers."""
    return provider.name == "fastrlhf" or provider.strong or provider.name.startswith("torch-matmul") \
        or provider.name == "torch-copy"


if __name__ == "__main__":
    sys.exit(main())
