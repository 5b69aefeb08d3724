"""fastrlhf benchmark suite: speed and memory of every kernel against the PyTorch reference (eager and
torch.compile), Liger-Kernel, TRL and faithful re-implementations of OpenRLHF/verl/TRL loops.

    python -m benchmarks            # everything this device can run -> results/<device>.csv, README, plots
    python -m benchmarks --quick    # a tiny subset (what CI runs on CPU)
    python -m benchmarks --only gae,token_logprobs --device cpu
    python -m benchmarks.report     # tables + plots from the CSVs already in results/

Modules: measure (timing, peak memory), device (names, versions, peaks), peers (other libraries'
code), cases (inputs, providers, bytes/FLOPs models, sweeps), runner (rows -> CSV), e2e (PPO and
DPO steps on a Qwen2-0.5B-sized model), report (CSV -> Markdown + PNG).
"""
