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

from benchmarks import cases, measure, report, results_csv, runner  # noqa: E402


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
    assert report.main(["--results-dir", str(tmp_path), "--readme", str(main_readme), "--update-readme"]) == 0
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


def test_rows_are_handed_over_per_provider_and_a_deadline_skips_the_rest():
    import time

    from benchmarks import device

    case = cases.logprobs_from_logits_case(8, 64, "fp32", "cpu", entropy=False)
    handed = []
    rows = runner.run_case(case, device.detect("cpu"), quick=True, modes=["forward"], memory=False,
                           providers=["torch-naive", "openrlhf-fp32"], on_rows=handed.append)
    assert [[r["provider"] for r in h] for h in handed] == [["torch-naive"], ["openrlhf-fp32"]]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    late = runner.run_case(case, device.detect("cpu"), quick=True, modes=["forward"], memory=False,
                           providers=["torch-naive"], deadline=time.monotonic() - 1)
    assert [r["status"] for r in late] == ["skipped: time budget"]


def test_cpu_peak_memory_sees_a_known_allocation():
    n = 1 << 20
    peak = measure.peak_bytes_cpu(lambda: torch.empty(n, dtype=torch.float32).fill_(1.0) * 2)
    # fill_ result (4 MiB) and the product (4 MiB) are alive together.
    assert 8 * n <= peak <= 8 * n + 65536


def test_cpu_timer_quantiles_are_ordered():
    t = measure.bench_cpu(lambda: torch.ones(1000).sum(), min_reps=7, min_time_s=0.0)
    assert t.reps >= 7 and t.p20_ms <= t.median_ms <= t.p80_ms


def _checkout_state() -> str | None:
    """`git status` plus the diff of the tracked files, or None outside a git checkout."""
    try:
        status = subprocess.run(["git", "status", "--porcelain=v1", "--untracked-files=all"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
        diff = subprocess.run(["git", "diff", "--binary", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return status + diff


def test_a_run_with_results_dir_writes_only_there(tmp_path):
    """Issue 12: no run rewrites README.md, results/README.md, the plots or the committed CSVs; the
    run's own tables and plots go to --results-dir; the report without --update-readme only prints."""
    before = _checkout_state()
    if before is None:
        pytest.skip("not a git checkout")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--results-dir", str(out),
                           "--only", "gae", "--providers", "fastrlhf,torch-reference"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"README.md"} and list(out.glob("cpu-*.csv"))
    assert list(out.glob("cpu-*__gae.png")), "the run's plot goes to --results-dir"
    assert report.main([]) == 0  # the committed CSVs: printed, nothing written
    assert report.main(["--print-only", "--results-dir", str(out)]) == 0
    assert _checkout_state() == before


def test_suite_runs_from_outside_the_repository(tmp_path):
    """`python path/to/benchmarks` works from any directory (`python -m benchmarks` needs the root)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--results-dir" in done.stdout and "--headline" in done.stdout


def test_a_fastrlhf_from_another_checkout_is_refused(monkeypatch):
    import benchmarks.__main__ as entry

    monkeypatch.setattr(entry, "REPO", Path("/nonexistent/checkout"))
    monkeypatch.delenv("BENCH_ALLOW_OTHER_FASTRLHF", raising=False)
    message = entry._check_fastrlhf()
    assert message and "/nonexistent/checkout" in message and "pip install -e" in message
    monkeypatch.setenv("BENCH_ALLOW_OTHER_FASTRLHF", "1")
    assert entry._check_fastrlhf() is None


def test_a_skipped_row_never_replaces_a_measured_one():
    key = dict(kernel="gae", provider="fastrlhf", mode="forward", dtype="fp32", shape="B=1,T=2")
    measured = [dict(key, status="ok", median_ms="1.5")]
    merged = results_csv.merge(measured, [dict(key, status="skipped: time budget"),
                                          dict(key, shape="B=1,T=4", status="skipped: time budget")])
    assert merged[0] == measured[0] and len(merged) == 2  # a new key is still recorded
    remeasured = results_csv.merge(measured, [dict(key, status="oom")])
    assert remeasured == [dict(key, status="oom")]


def _row(kernel, provider, shape, *, ms, peak, pct="", mode="full", status="ok", device="NVIDIA H200"):
    return dict(kernel=kernel, provider=provider, shape=shape, mode=mode, dtype="bf16", median_ms=str(ms),
                peak_bytes=str(peak), pct_of_peak=pct, status=status, device=device, date="2026-12-01 10:00 UTC")


def test_targets_are_not_measured_without_gpu_rows_and_checked_with_them():
    shape = "N=16384,V=151936,H=4096"
    cpu = {"cpu-amd-epyc": [_row("token_logprobs", "fastrlhf", shape, ms=1, peak=1, device="AMD EPYC")]}
    lines = report.targets_section(cpu)
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| target")]
    assert len(body) == len(report.TARGETS) and all(line.endswith("| not measured yet |") for line in body)

    gpu = {"nvidia-h200": [_row("token_logprobs", "fastrlhf", shape, ms=110, peak=2e9, pct="76.0"),
                           _row("token_logprobs", "trl-full-logits", shape, ms=100, peak=9e9),
                           _row("token_logprobs", "liger-flce", shape, ms=140, peak=1e9),
                           _row("token_logprobs", "torch-full-logits", shape, ms=10, peak=1)]}
    [line] = [x for x in report.targets_section(gpu) if x.startswith("| token_logprobs")]
    # time 1.10x TRL (<= 1.15: met), memory 2.0x Liger FLCE (> 1.0: missed), 76% of peak (>= 75: met);
    # the much faster torch-full-logits row is not the target's peer.
    assert "time 1.10× trl-full-logits" in line and "memory 2.00× liger-flce" in line and "76% of peak" in line
    assert line.endswith("| missed |") and "NVIDIA H200, 2026-12-01" in line
    assert any(x.startswith("| policy_loss_from_hidden") and x.endswith("not measured yet |")
               for x in report.targets_section(gpu))


def test_readme_block_keeps_each_fastrlhf_variant_apart():
    shape = "model=qwen2-0.5b,B=8,T=1024,ckpt"
    rows = [_row("e2e_ppo_step", "fastrlhf-shared-lora", shape, ms=400, peak=10, pct=""),
            _row("e2e_ppo_step", "fastrlhf-shared-lora-fused", shape, ms=300, peak=9),
            _row("e2e_ppo_step", "separate-models-fused", shape, ms=330, peak=30)]
    entries = report.summarise(rows)
    ratios = {e["ours"]["provider"]: (e["best_t"]["provider"], round(e["t_ratio"], 3)) for e in entries}
    # each variant against the separate models, never against the other fastrlhf variant
    assert ratios == {"fastrlhf-shared-lora": ("separate-models-fused", round(400 / 330, 3)),
                      "fastrlhf-shared-lora-fused": ("separate-models-fused", round(300 / 330, 3))}
    block = report.readme_block({"nvidia-h200": rows})
    assert "e2e_ppo_step (fastrlhf-shared-lora-fused)" in block and "e2e_ppo_step (fastrlhf-shared-lora)" in block


def test_lm_head_rows_count_the_gemms_each_algorithm_executes():
    B, T, V, H = 2, 64, 4096, 64
    n, mm = B * T, 2.0 * B * T * V * H
    gpu = {p.name: p for p in cases.policy_loss_from_hidden_case(B, T, V, H, "bf16", "cuda").providers}
    assert gpu["fastrlhf"].work("full") == (3 * mm, "TFLOP/s")  # gradients in the forward: 6·N·V·H
    assert gpu["liger-fused-linear-grpo"].work("full")[0] == 4 * mm  # remakes the logits: 8·N·V·H
    cpu = {p.name: p for p in cases.policy_loss_from_hidden_case(B, T, V, H, "fp32", "cpu").providers}
    assert cpu["fastrlhf"].work("full")[0] == 4 * mm  # off GPU it runs its twin (recompute)
    tl = {p.name: p for p in cases.token_logprobs_case(n, V, H, "bf16", "cuda", entropy=False).providers}
    assert tl["fastrlhf"].work("full")[0] == 4 * mm and tl["trl-full-logits"].work("full")[0] == 3 * mm
    assert tl["liger-flce"].work("forward")[0] == 3 * mm and tl["liger-flce"].work("backward")[0] == 0


def test_headline_cases_run_on_cpu_against_the_strong_peers():
    from benchmarks import device
    from benchmarks.__main__ import _headline_selection

    headline = cases.headline("cpu")
    kernels = [c.kernel for c in headline]
    assert kernels[:3] == ["ceiling:gemm", "ceiling:copy", "policy_loss_from_hidden"]
    assert {"token_logprobs", "grpo_from_logits", "dpo_from_hidden", "dpo_loss_from_hidden",
            "sft_loss_from_hidden"} <= set(kernels)
    for case in headline:
        names = {p.name for p in runner.selected(case, _headline_selection)}
        assert "torch-reference" not in names and "torch-compile" not in names
        assert case.kernel.startswith("ceiling:") or ("fastrlhf" in names and len(names) >= 2), case.kernel
    policy = headline[2]
    # (the "+compiled-loss" pipelines are left out here: torch.compile on CPU takes longer than the rest)
    rows = runner.run_case(policy, device.detect("cpu"), quick=True, memory=False,
                           providers=["fastrlhf", "liger-fused-linear-grpo"])
    if any(r["status"].startswith("not installed") for r in rows):
        pytest.skip("liger-kernel is not installed")
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["mode"] for r in rows} == {"full"}
    # the same loss as the PyTorch twin of the composition, Liger's GRPO loss included
    assert all(float(r["max_abs_diff"]) < 1e-5 for r in rows), [r["max_abs_diff"] for r in rows]
    [cute] = [p for p in policy.providers if p.name == "liger-cute-head+compiled-loss"]
    assert cute.backend == "torch" and "torch chunks" in cute.note  # which Liger path runs here, said per row


E2E_PROVIDERS = ("fastrlhf-shared-lora-fused", "fastrlhf-shared-lora", "separate-models-fused")


def _e2e_rows(tmp_path: Path, *extra: str, providers=E2E_PROVIDERS[1:]) -> list[dict]:
    _run_suite(tmp_path, "--only", "e2e", "--providers", ",".join(providers), *extra)
    [csv_file] = list(tmp_path.glob("cpu-*.csv"))
    return list(csv.DictReader(open(csv_file)))


@pytest.mark.slow  # ~100 s on one CPU thread: twelve e2e steps
def test_e2e_steps_with_and_without_activation_checkpointing(tmp_path):
    rows = _e2e_rows(tmp_path, providers=E2E_PROVIDERS)
    by = {(r["kernel"], r["provider"], r["shape"].endswith(",ckpt")): r for r in rows}
    assert len(by) == len(rows) == 2 * 3 * 2  # {ppo, dpo} x {shared-lora fused/not, separate} x {ckpt, not}
    for r in rows:
        assert r["status"] == "ok" and r["mode"] == "full", r
        static = report.static_bytes(r)
        assert static and 0 < static < int(r["peak_bytes"]), r  # step activations on top of the static bytes
    for kernel in ("e2e_ppo_step", "e2e_dpo_step"):
        for provider in E2E_PROVIDERS:
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
