"""Run benchmark cases and append the results to `benchmarks/results/<device-slug>.csv`.

One row per (kernel, shape, dtype, provider, mode). A provider that cannot run here still gets a
row, with `status` saying why ("needs CUDA", "not installed", "not available yet", "oom", "error: ...")
and empty numbers, so the table shows what was not measured instead of silently omitting it.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from benchmarks import measure
from benchmarks.cases import Case, Provider
from benchmarks.device import DeviceInfo, today
from benchmarks.results_csv import COLUMNS, KEY, read_rows, write_rows  # noqa: F401  (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Which providers of a case to run: names, a predicate, or None for all.
Selection = Iterable[str] | Callable[[Provider], bool] | None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _outputs(out: Any) -> list[torch.Tensor]:
    """The tensors a provider returned that gradients can flow back from."""
    if isinstance(out, torch.Tensor):
        items = [out]
    elif isinstance(out, (tuple, list)):
        items = [o for o in out if isinstance(o, torch.Tensor)]  # drops a (loss, metrics) dict
    else:
        items = []
    return [t for t in items if t.requires_grad]


def _grad_leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]


def _upstream(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randn(o.shape, generator=g).to(o.device, o.dtype) if o.dim() else torch.ones_like(o)
            for o in outs]


def _mode_fn(provider: Provider, inputs: dict, mode: str):
    """A zero-argument callable that runs `mode` once."""
    leaves = _grad_leaves(inputs)
    if mode == "forward":
        if provider.differentiable and leaves:
            return lambda: provider.fn(inputs)
        with_grad = provider.fn

        def fwd_no_grad():
            with torch.no_grad():
                return with_grad(inputs)
        return fwd_no_grad
    out = provider.fn(inputs)
    outs = _outputs(out)
    if not outs:
        raise RuntimeError("output does not require grad")
    grads = _upstream(outs)
    if mode == "backward":
        return lambda: torch.autograd.backward(outs, grads, retain_graph=True)

    def full():
        o = _outputs(provider.fn(inputs))
        torch.autograd.backward(o, grads)
    return full


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def selected(case: Case, providers: Selection) -> list[Provider]:
    if providers is None:
        return list(case.providers)
    if callable(providers):
        return [p for p in case.providers if providers(p)]
    names = set(providers)
    return [p for p in case.providers if p.name in names]


PATH_NOTE = "path: "  # prefix of a provider's own note in the CSV (the report shows those)


def _note(case: Case, provider: Provider) -> str:
    return "; ".join(n for n in (case.note, provider.note and PATH_NOTE + provider.note) if n)


def run_case(case: Case, info: DeviceInfo, *, quick: bool, providers: Selection = None,
             modes: Iterable[str] | None = None, memory: bool = True, deadline: float | None = None,
             on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The rows of one case. Past `deadline` (time.monotonic()) the remaining providers get
    "skipped: time budget" rows; `on_rows` receives each provider's rows as soon as they exist, so
    that a run killed in the middle of a long case keeps what it measured."""
    device = info.device
    base = {"kernel": case.kernel, "dtype": case.dtype, "shape": case.shape_str, "device": info.name,
            "date": today(), **{k: info.versions.get(k, "") for k in
                                ("torch", "triton", "fastrlhf", "liger_kernel", "trl")}}
    rows = []
    inputs = case.make_inputs(device)
    ref_out = _reference_output(case, inputs, device)
    wanted_modes = [m for m in case.modes if modes is None or m in modes]
    for provider in selected(case, providers):
        first = len(rows)
        status = provider.status(device)
        if deadline is not None and time.monotonic() > deadline:
            status = "skipped: time budget"
        diff = ""
        if not status:
            # One untimed call: compiles/autotunes, checks it runs, and gives the correctness column.
            try:
                with torch.no_grad():
                    out = provider.fn(inputs)
                if ref_out is not None and case.compare is not None:
                    diff = f"{case.compare(out, ref_out, inputs):.3g}"
                del out
            except Exception as exc:
                status = _error_status(exc)
            _free(device)
        for mode in wanted_modes:
            row = dict(base, provider=provider.name, mode=mode, backend=provider.backend, max_abs_diff=diff,
                       note=_note(case, provider))
            if status:
                rows.append(dict(row, status=status))
                continue
            if mode != "forward" and not provider.differentiable:
                rows.append(dict(row, status="no backward (forward-only function)"))
                continue
            rows.append(_measure(case, provider, inputs, mode, row, info, quick=quick, memory=memory))
            _free(device)
        for t in _grad_leaves(inputs):
            t.grad = None
        if on_rows is not None:
            on_rows(rows[first:])
    del inputs, ref_out
    _free(device)
    return rows


def _reference_output(case: Case, inputs: dict, device: str):
    """The PyTorch reference's forward output, the yardstick of the max_abs_diff column."""
    for provider in case.providers:
        if provider.name == "torch-reference" and not provider.status(device):
            try:
                with torch.no_grad():
                    return provider.fn(inputs)
            except Exception:
                return None
    return None


def _error_status(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _measure(case, provider, inputs, mode, row, info, *, quick, memory) -> dict:
    device = info.device
    try:
        fn = _mode_fn(provider, inputs, mode)
        timing = measure.bench(fn, device, grad_to_none=_grad_leaves(inputs), quick=quick)
        peak = ""
        if memory and mode in ("forward", "full"):
            for t in _grad_leaves(inputs):
                t.grad = None
            peak = measure.peak_bytes(fn, device)
        del fn
    except Exception as exc:
        return dict(row, status=_error_status(exc))
    amount, unit = (provider.work or case.work)(mode)
    achieved = amount / (timing.median_ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
    peak_hw = info.peak_for(unit, case.dtype)
    pct = ""
    if peak_hw:
        pct = f"{100 * achieved * (1e12 if unit == 'TFLOP/s' else 1e9) / peak_hw:.1f}"
    log(f"  {case.kernel:<28} {case.shape_str:<28} {case.dtype:<5} {provider.name:<18} {mode:<8} "
        f"{timing.median_ms:9.3f} ms  peak {peak if peak != '' else '-':>12}")
    return dict(row, median_ms=f"{timing.median_ms:.4g}", p20_ms=f"{timing.p20_ms:.4g}",
                p80_ms=f"{timing.p80_ms:.4g}", peak_bytes=peak, achieved=f"{achieved:.4g}", achieved_unit=unit,
                pct_of_peak=pct, status="ok")


# ----------------------------------------------------------------------------- CSV


def csv_path(info: DeviceInfo, results_dir: Path | None = None) -> Path:
    return Path(results_dir or RESULTS_DIR) / f"{info.slug}.csv"


def run_all(cases: list[Case], info: DeviceInfo, path: Path, *, quick: bool, fresh: bool = False,
            deadline: float | None = None, providers: Selection = None, modes=None) -> list[dict]:
    """Run every case, merging each provider's rows into the CSV as soon as they exist, so an
    interrupted run keeps what it measured. `fresh`: start from an empty CSV."""
    if fresh:
        write_rows(path, [], fresh=True)
    all_rows: list[dict] = []
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            rows = [dict(kernel=case.kernel, provider=p.name, mode=m, dtype=case.dtype, shape=case.shape_str,
                         device=info.name, date=today(), status="skipped: time budget")
                    for p in selected(case, providers) for m in case.modes if modes is None or m in modes]
            write_rows(path, rows)
        else:
            log(f"[{case.kernel}] {case.shape_str} {case.dtype}")
            rows = run_case(case, info, quick=quick, providers=providers, modes=modes, deadline=deadline,
                            on_rows=lambda provider_rows: write_rows(path, provider_rows))
        all_rows += rows
    return all_rows
