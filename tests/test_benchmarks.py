"""The benchmark suite runs end to end on CPU on a tiny case and writes well-formed CSV/Markdown/PNG.

Runs `python -m benchmarks` in a subprocess (as a user would, and so tests/conftest.py's
TRITON_INTERPRET=1 does not leak into timings), on two cheap kernels with three providers each.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a top-level folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import measure, report, runner  # noqa: E402


def _run_suite(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--results-dir", str(tmp_path),
           "--no-report", *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_quick_cpu_run_writes_csv_markdown_and_plots(tmp_path):
    _run_suite(tmp_path, "--only", "gae,dpo_loss", "--providers", "fastrlhf,torch-reference,trl-loop,trl,liger-flce")
    [csv_file] = list(tmp_path.glob("cpu-*.csv"))
    rows = list(csv.DictReader(open(csv_file)))
    assert set(rows[0]) == set(runner.COLUMNS)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"gae", "dpo_loss(sigmoid)"}
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["achieved"]) > 0 and r["achieved_unit"] == "GB/s"
        assert r["pct_of_peak"] == ""  # no CPU peak table: left blank, not invented
        assert r["device"] and r["torch"] and r["date"]
    providers = {(r["kernel"], r["provider"]) for r in ok}
    assert ("gae", "fastrlhf") in providers and ("gae", "trl-loop") in providers
    # GAE is forward-only; its fastrlhf and TRL-loop advantages agree on the response tokens.
    gae_rows = [r for r in ok if r["kernel"] == "gae"]
    assert {r["mode"] for r in gae_rows} == {"forward"}
    assert all(float(r["max_abs_diff"]) < 1e-3 for r in gae_rows)
    # dpo has a backward: forward/full rows carry a peak memory, backward rows do not.
    dpo = [r for r in ok if r["kernel"] == "dpo_loss(sigmoid)"]
    assert {r["mode"] for r in dpo} == {"forward", "backward", "full"}
    assert all(r["peak_bytes"] != "" for r in dpo if r["mode"] != "backward")

    # Writing a re-measured row merges into the CSV instead of duplicating it.
    runner.write_rows(csv_file, [dict(rows[0], median_ms="1")])
    again = list(csv.DictReader(open(csv_file)))
    assert len(again) == len(rows) and again[0]["median_ms"] == "1"

    main_readme = tmp_path / "MAIN.md"
    main_readme.write_text("# demo\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\ntail\n")
    assert report.main(["--results-dir", str(tmp_path), "--readme", str(main_readme)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| kernel | shape | dtype | mode | fastrlhf ms |" in text
    assert "gae" in text and "trl-loop" in text
    block = main_readme.read_text()
    assert "\nold\n" not in block and "time ratio" in block and block.endswith("<!-- bench:end -->\n\ntail\n")
    assert list(tmp_path.glob("cpu-*__gae.png")), "time/memory vs T plot for gae"


def test_readme_markers_are_rewritten(tmp_path):
    readme = tmp_path / "MAIN.md"
    readme.write_text("intro\n<!-- bench:start -->\nstale\n<!-- bench:end -->\noutro\n")
    assert report.update_readme(readme, "| new |\n")
    assert readme.read_text() == "intro\n<!-- bench:start -->\n| new |\n<!-- bench:end -->\noutro\n"
    assert report.update_readme(readme, "again\n")  # markers are kept, so it can be rewritten again


def test_unavailable_provider_gets_a_row_with_the_reason():
    from benchmarks import cases, device

    info = device.detect("cpu")
    case = cases.logprobs_from_logits_case(8, 64, "fp32", "cpu", entropy=False)
    case.providers.append(cases.Provider("broken", lambda x: 1 / 0))
    rows = runner.run_case(case, info, quick=True, modes=["forward"], memory=False,
                           providers=["liger-selective", "torch-naive", "broken"])
    status = {r["provider"]: r["status"] for r in rows}
    assert status["torch-naive"] == "ok"
    assert status["liger-selective"] != "ok"  # needs CUDA here (or: not installed)
    assert status["broken"].startswith("error: ZeroDivisionError")


def test_cpu_peak_memory_sees_a_known_allocation():
    n = 1 << 20
    peak = measure.peak_bytes_cpu(lambda: torch.empty(n, dtype=torch.float32).fill_(1.0) * 2)
    # fill_ result (4 MiB) and the product (4 MiB) are alive together.
    assert 8 * n <= peak <= 8 * n + 65536


def test_cpu_timer_quantiles_are_ordered():
    t = measure.bench_cpu(lambda: torch.ones(1000).sum(), min_reps=7, min_time_s=0.0)
    assert t.reps >= 7 and t.p20_ms <= t.median_ms <= t.p80_ms


def _e2e_rows(tmp_path: Path, *extra: str) -> list[dict]:
    _run_suite(tmp_path, "--only", "e2e", "--providers", "fastrlhf-shared-lora,separate-models-fused", *extra)
    [csv_file] = list(tmp_path.glob("cpu-*.csv"))
    return list(csv.DictReader(open(csv_file)))


@pytest.mark.slow  # ~35 s on one CPU thread: eight e2e steps
def test_e2e_steps_with_and_without_activation_checkpointing(tmp_path):
    rows = _e2e_rows(tmp_path)
    by = {(r["kernel"], r["provider"], r["shape"].endswith(",ckpt")): r for r in rows}
    assert len(by) == len(rows) == 2 * 2 * 2  # {ppo, dpo} x {shared-lora, separate} x {ckpt, not}
    for r in rows:
        assert r["status"] == "ok" and r["mode"] == "full", r
        static = report.static_bytes(r)
        assert static and 0 < static < int(r["peak_bytes"]), r  # step activations on top of the static bytes
    for kernel in ("e2e_ppo_step", "e2e_dpo_step"):
        for provider in ("fastrlhf-shared-lora", "separate-models-fused"):
            ckpt, plain = by[kernel, provider, True], by[kernel, provider, False]
            # Same models and optimizer; checkpointing only drops the trunks' saved activations
            # (tiny CPU model: ~7 MiB of ~105 MiB for the shared-LoRA PPO step, the rest is the LM head).
            assert report.static_bytes(ckpt) == report.static_bytes(plain)
            assert int(ckpt["peak_bytes"]) < int(plain["peak_bytes"]), (kernel, provider)
    # One base + adapters holds far fewer static bytes than four full models with their optimizer.
    shared, separate = (report.static_bytes(by["e2e_ppo_step", p, True])
                        for p in ("fastrlhf-shared-lora", "separate-models-fused"))
    assert shared < separate / 4
    # The report keeps the two configurations apart (grouped by shape) and shows the static bytes.
    entries = report.summarise(rows)
    assert {e["shape"] for e in entries if e["kernel"] == "e2e_ppo_step"} == {
        by["e2e_ppo_step", "fastrlhf-shared-lora", c]["shape"] for c in (True, False)}
    assert any("(static " in line for line in report.detail_table(rows))


def test_e2e_time_budget_skips_cleanly(tmp_path):
    rows = _e2e_rows(tmp_path, "--max-minutes", "0.0001")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"skipped: time budget"}
    assert {r["shape"].endswith(",ckpt") for r in rows} == {True, False}
