"""DistContext with one process (in-process) and with two gloo processes under torchrun.

This file is also the torchrun worker: `python -m torch.distributed.run --nproc-per-node 2
tests/test_distributed.py <scenario>` runs one of the `_scenario_*` functions on every rank.
"""
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from fastrlhf.distributed import DistContext, epoch_order, global_masked_mean_var, whiten_global

HERE = os.path.abspath(__file__)


def torchrun_env() -> dict:
    """Environment for child training processes: torch backend, no Triton interpreter, 1 thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTRLHF_BACKEND="torch", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_torchrun(args, nproc=2, timeout=120, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=env or torchrun_env(), capture_output=True, text=True, timeout=timeout)


def child_output(result) -> str:
    """The whole stdout and stderr of a finished child (assertion message: a rank's abort or
    traceback can sit anywhere in it, e.g. before torchrun's long failure summary)."""
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def gloo_threads() -> list[str]:
    """Names of this process's live gloo threads: torch names them pt_gloo_runloop / gloo_tcp_loop
    (Linux /proc; elsewhere [] and only close()'s warning checks the teardown)."""
    if not os.path.isdir("/proc/self/task"):
        return []
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n]


def close_and_check(ctx: DistContext) -> None:
    """ctx.close(), then insist the group is really gone: a gloo group that outlives close() keeps
    worker threads that can abort the process during interpreter shutdown (DistContext.close).
    Deterministic, unlike the abort it prevents (a preempted worker, a few % of runs under load)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # close() warns when the group is still referenced
        ctx.close()
    assert not gloo_threads(), f"rank {ctx.rank}: gloo threads still alive after close(): {gloo_threads()}"


# ----------------------------------------------------------------------------- one process
def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistContext.from_env(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.shard([3, 1, 2]) == [3, 1, 2]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    ctx.sync_gradients([p])
    assert p.grad.tolist() == [3.0, 3.0]
    metrics = ctx.reduce_metrics({"loss": torch.tensor(2.0), "lr": 0.5})
    assert float(metrics["loss"]) == 2.0 and float(metrics["lr"]) == 0.5
    module = torch.nn.Linear(2, 2)
    assert ctx.apply_fsdp(module) is module and not ctx.fsdp
    assert ctx.broadcast_object("x") == "x"
    ctx.barrier(), ctx.close()


def test_shard_pads_like_distributed_sampler():
    items = list(range(5))
    shards = [DistContext(rank=r, world_size=2).shard(items) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 0]]
    shards = [DistContext(rank=r, world_size=4).shard([7]) for r in range(4)]
    assert shards == [[7]] * 4
    with pytest.raises(ValueError, match="empty"):
        DistContext(rank=0, world_size=2).shard([])


def test_epoch_order_is_seeded_per_epoch():
    items = list(range(20))
    a0 = epoch_order(items, seed=1, epoch=0)
    assert a0 == epoch_order(items, seed=1, epoch=0) and sorted(a0) == items
    assert a0 != epoch_order(items, seed=1, epoch=1)
    assert epoch_order(items, seed=1, epoch=0, shuffle=False) == items


def _reference_masked_whiten(x, mask, eps=1e-8):
    """float64 closed form (torch.var, unbiased like TRL's masked_var), 0 outside the mask."""
    x64, m64 = x.double(), mask.double()
    vals = x64[m64.bool()]
    mean, var = vals.mean(), vals.var(unbiased=True)
    return torch.where(m64.bool(), (x64 - mean) / torch.sqrt(var + eps), 0.0)


def _offset_batch(generator=None):
    """x = 1e4 + N(0, 1): E[x^2] ~ 1e8, where an fp32 ulp is 8, so E[x^2] - mean^2 loses the whole
    variance (~1); the two-pass sum of (x - mean)^2 keeps it to fp32 rounding of the mean (~1e-3)."""
    x = 1e4 + torch.randn(4, 33, generator=generator)
    mask = torch.rand(4, 33, generator=generator) > 0.3
    return x, mask


def test_global_whiten_on_one_process_matches_closed_form():
    x = torch.randn(3, 7)
    mask = (torch.rand(3, 7) > 0.3).float()
    mean, var = global_masked_mean_var(x, mask)
    vals = x[mask.bool()].double()
    torch.testing.assert_close(mean.double(), vals.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), vals.var(), rtol=1e-5, atol=1e-6)
    out = whiten_global(x, mask)
    torch.testing.assert_close(out.double(), _reference_masked_whiten(x, mask), rtol=1e-5, atol=1e-5)
    m0, v0 = global_masked_mean_var(x, torch.zeros_like(mask))
    assert float(m0) == 0.0 and float(v0) == 0.0


def test_global_mean_var_two_pass_survives_large_offset():
    x, mask = _offset_batch()
    mean, var = global_masked_mean_var(x, mask)
    vals = x[mask].double()
    assert mean.dtype == var.dtype == torch.float32
    assert abs(float(var) - float(vals.var())) < 1e-4 * float(vals.var())
    torch.testing.assert_close(whiten_global(x, mask).double(), _reference_masked_whiten(x, mask), rtol=0, atol=5e-3)
    mean64, var64 = global_masked_mean_var(x.double(), mask)
    assert var64.dtype == torch.float64
    torch.testing.assert_close(var64, vals.var(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("case", ["random", "junk_outside_mask", "large_offset", "float64", "bfloat16", "empty_mask"])
def test_global_whiten_on_one_process_is_library_whiten(case, shift_mean):
    """Exactly fastrlhf.whiten, everywhere (0 outside the mask), same dtype, with ctx None or a
    one-process DistContext."""
    import fastrlhf

    x = torch.randn(4, 9)
    mask = torch.rand(4, 9) > 0.4
    if case == "junk_outside_mask":
        junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30]).repeat(9).reshape(4, 9)
        x = torch.where(mask, x, junk)
    elif case == "large_offset":
        x, mask = _offset_batch()
    elif case == "float64":
        x = x.double()
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "empty_mask":
        mask = torch.zeros_like(mask)
    expected = fastrlhf.whiten(x, mask, shift_mean=shift_mean)
    for ctx in (None, DistContext()):
        out = whiten_global(x, mask, ctx, shift_mean=shift_mean)
        assert out.dtype == expected.dtype == (torch.float64 if case == "float64" else torch.float32)
        assert torch.equal(out, expected), (out - expected).abs().max()
        assert not out[~mask].any()


def test_global_whiten_gradient_on_one_process_is_library_whiten():
    import fastrlhf

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    weights = torch.randn(3, 5, dtype=torch.float64)
    (grad_global,) = torch.autograd.grad((whiten_global(x, mask) * weights).sum(), x)
    (grad_library,) = torch.autograd.grad((fastrlhf.whiten(x, mask) * weights).sum(), x)
    assert torch.equal(grad_global, grad_library)


def test_close_frees_the_group_or_warns_that_something_still_holds_it():
    """close() destroys the group this context created and joins its gloo threads; while something
    still references the group (a plain list here, an FSDP-sharded model in real runs) it warns,
    because those threads then live on into interpreter shutdown, where they can abort the process."""
    import gc
    import warnings

    import torch.distributed as dist
    import torch.distributed.nn.functional  # noqa: F401  (imported after init it would pin the group, see from_env)

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("reads this process's threads from Linux /proc")

    def threads() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    for held in (True, False):
        before = threads()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        group_threads = threads() - before  # gloo's I/O loop and workers (named by themselves, later)
        assert group_threads
        ctx = DistContext(rank=0, world_size=1, backend="gloo", _owns_group=True)
        holder = [dist.group.WORLD] if held else []
        if held:
            with pytest.warns(RuntimeWarning, match="still referenced"):
                ctx.close()
            assert group_threads <= threads() and not dist.is_initialized()
            holder.clear()
            gc.collect()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                ctx.close()
        assert not group_threads & threads() and not dist.is_initialized()
        ctx.close()  # twice: no-op


# ----------------------------------------------------------------------------- two processes
def test_two_gloo_processes_collectives_and_fsdp():
    result = run_torchrun([HERE, "collectives"])
    assert result.returncode == 0, child_output(result)
    assert result.stdout.count("collectives ok") == 2, result.stdout


def test_failing_rank_brings_the_job_down_with_its_error():
    env = torchrun_env()
    env["FASTRLHF_DIST_TIMEOUT_MINUTES"] = "2"
    start = time.monotonic()
    result = run_torchrun([HERE, "fail"], timeout=150, env=env)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 exploded on purpose" in output, output[-4000:]
    assert elapsed < 100, f"the job took {elapsed:.0f}s to come down"


class _TinyStack(torch.nn.Module):
    """A decoder-like stack: FSDP shards each entry of `layers`; `features` is a non-forward method."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.head = torch.nn.Linear(8, 1)

    def features(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h

    def forward(self, x):
        return self.head(self.features(x))


def _train_two_steps(model, batches, ctx=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for x in batches:
        loss = model(x).pow(2).mean()
        loss.backward()
        if ctx is not None:
            ctx.sync_gradients(model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def _scenario_collectives():
    ctx = DistContext.from_env()
    _check_collectives(ctx)  # returns with its models (FSDP-sharded ones too) dropped
    close_and_check(ctx)
    print("collectives ok", flush=True)


def _check_collectives(ctx: DistContext) -> None:
    from fastrlhf.distributed import full_state_dict, load_full_state_dict

    r, w = ctx.rank, ctx.world_size
    assert w == 2 and ctx.backend == "gloo" and ctx.is_main == (r == 0)
    assert ctx.shard(list(range(5))) == [[0, 2, 4], [1, 3, 0]][r]

    # sync_gradients: mean over ranks; None counts as zeros; None everywhere stays None; mixed dtypes
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    c = torch.nn.Parameter(torch.zeros(1))
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    a.grad = torch.full((3,), float(r + 1))
    b.grad = None if r == 0 else torch.full((2, 2), 4.0, dtype=torch.float64)
    ctx.sync_gradients([a, b, c, frozen])
    assert a.grad.tolist() == [1.5] * 3, a.grad
    assert b.grad.dtype == torch.float64 and b.grad.tolist() == [[2.0, 2.0], [2.0, 2.0]], b.grad
    assert c.grad is None and frozen.grad is None

    metrics = ctx.reduce_metrics({"loss": torch.tensor(float(r)), "n": 2 * r})
    assert float(metrics["loss"]) == 0.5 and float(metrics["n"]) == 1.0
    assert ctx.broadcast_object(f"from {r}") == "from 0"

    # whitening over both ranks == whitening of the concatenated batch on one process
    g = torch.Generator().manual_seed(0)
    x_all, m_all = torch.randn(4, 6, generator=g), (torch.rand(4, 6, generator=g) > 0.3).float()
    rows = slice(2 * r, 2 * r + 2)
    local = whiten_global(x_all[rows], m_all[rows], ctx)
    assert local.dtype == torch.float32 and not local[m_all[rows] == 0].any()
    torch.testing.assert_close(local, whiten_global(x_all, m_all)[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local.double(), _reference_masked_whiten(x_all, m_all)[rows], rtol=1e-5, atol=1e-5)
    # two-pass statistics across ranks: a 1e4 offset does not wipe out the variance
    x_off, m_off = _offset_batch(torch.Generator().manual_seed(1))  # own generator: keeps g's draws below
    mean, var = global_masked_mean_var(x_off[rows], m_off[rows], ctx)
    assert abs(float(var) - float(x_off[m_off].double().var())) < 1e-4 * float(x_off[m_off].double().var()), var
    torch.testing.assert_close(whiten_global(x_off[rows], m_off[rows], ctx).double(),
                               _reference_masked_whiten(x_off, m_off)[rows], rtol=0, atol=5e-3)

    # DDP semantics: two ranks with half of the global batch each == one process with the whole batch
    torch.manual_seed(0)
    reference = _TinyStack()
    batches = [torch.randn(4, 6, generator=g) for _ in range(2)]
    ddp = _TinyStack()
    ddp.load_state_dict(reference.state_dict())
    _train_two_steps(reference, batches)
    _train_two_steps(ddp, [x[rows] for x in batches], ctx)
    for (name, p), q in zip(reference.named_parameters(), ddp.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=f"DDP {name}")

    # FSDP2 on gloo/CPU: same result within tolerance; a non-forward method registered for gathering
    torch.manual_seed(0)
    fsdp = _TinyStack()
    initial = {k: v.clone() for k, v in fsdp.state_dict().items()}
    ctx.apply_fsdp(fsdp, forward_methods=("features",))
    assert ctx.fsdp and type(fsdp.layers[0].weight).__name__ == "DTensor"
    from transformers.integrations.fsdp import is_fsdp_managed_module  # HF generate -> synced_gpus

    assert all(is_fsdp_managed_module(m) for m in fsdp.modules())
    ctx.sync_gradients(fsdp.parameters())  # no-op on FSDP-managed params (no grads yet, must not hang)
    _train_two_steps(fsdp, [x[rows] for x in batches], ctx)
    gathered = full_state_dict(dict(fsdp.named_parameters()))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(gathered[name], p.detach(), rtol=1e-5, atol=1e-5, msg=f"FSDP {name}")
    assert fsdp.features(batches[0][rows]).shape == (2, 8)
    # loading full tensors back into the sharded model
    load_full_state_dict(fsdp, {k: v for k, v in initial.items()})
    again = full_state_dict(dict(fsdp.named_parameters()))
    for name, value in initial.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)


def _scenario_fail():
    ctx = DistContext.from_env()
    if ctx.rank == 1:
        raise ValueError("rank 1 exploded on purpose")
    ctx.barrier()  # rank 0 would wait here forever without the agent tearing the job down
    time.sleep(600)


# ----------------------------------------------------------------------------- real trainer runs
SFT_WORDS = "red green blue black white cat dog bird fish sun moon one two three four five".split()


def sft_records(n: int = 12) -> list[dict]:
    """Toy SFT data with completions of different lengths (token-mean weighting matters)."""
    records = []
    for i in range(n):
        words = [SFT_WORDS[(i * 7 + j * 3) % len(SFT_WORDS)] for j in range(2 + i % 4)]
        records.append({"prompt": "say " + " ".join(words[:2]), "completion": " ".join(words)})
    return records


def run_sft_subprocess(options: dict, *, nproc: int = 1, timeout: int = 240, wait: bool = True):
    """Run `_scenario_sft` with `options` in a fresh process (or under torchrun with nproc > 1)."""
    import json

    args = [HERE, "sft", json.dumps(options)]
    if nproc > 1:
        return run_torchrun(args, nproc=nproc, timeout=timeout)
    cmd = [sys.executable, *args]
    if not wait:
        return subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)


def read_run(output_dir) -> tuple[dict, list[dict]]:
    """(final policy weights, metrics.jsonl records with a loss) of a finished `_scenario_sft` run."""
    import json

    from safetensors.torch import load_file

    weights = load_file(os.path.join(output_dir, "final_policy.safetensors"))
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        metrics = [r for r in map(json.loads, f) if "loss" in r]
    return weights, metrics


SFT_RUN = {"batch_size": 4, "max_steps": 6, "save_steps": 2}  # global batch 4, checkpoints at 2, 4, 6


def uninterrupted_sft_run(tmp_path_factory) -> str:
    """Output dir of the single-process reference run (made once per test session, shared by files)."""
    out = tmp_path_factory.getbasetemp() / "sft-uninterrupted"
    if not (out / "final_policy.safetensors").exists():
        result = run_sft_subprocess(dict(SFT_RUN, output_dir=str(out)))
        assert result.returncode == 0, child_output(result)
    return str(out)


def assert_same_run(output_dir, reference_dir, *, weight_tol: float, loss_tol: float) -> None:
    weights, metrics = read_run(output_dir)
    ref_weights, ref_metrics = read_run(reference_dir)
    assert sorted(weights) == sorted(ref_weights)
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=weight_tol, atol=weight_tol, msg=name)
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics] == list(range(1, SFT_RUN["max_steps"] + 1))
    for got, want in zip(metrics, ref_metrics):
        assert abs(got["loss"] - want["loss"]) <= loss_tol, (got, want)
    assert ref_metrics[-1]["loss"] < ref_metrics[0]["loss"]  # it did learn something


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_sft_matches_single_process(tmp_path, tmp_path_factory, fsdp):
    """torchrun, 2 gloo ranks x batch 2 == 1 process x batch 4: same weights and logged losses.

    Completions have different lengths, so this also checks the global token-mean weighting.
    FSDP2 (fully_shard on each decoder layer + root) on CPU/gloo works in torch 2.13 and agrees
    to float rounding too.
    """
    reference = uninterrupted_sft_run(tmp_path_factory)
    options = dict(SFT_RUN, batch_size=2, output_dir=str(tmp_path / "run"), fsdp=fsdp)
    result = run_sft_subprocess(options, nproc=2)
    assert result.returncode == 0, child_output(result)
    assert_same_run(tmp_path / "run", reference, weight_tol=1e-5, loss_tol=1e-5)
    if fsdp:  # resume a sharded run (gathered adapters + DCP optimizer state) from checkpoint-4
        import shutil

        shutil.rmtree(tmp_path / "run" / "checkpoint-6")
        os.remove(tmp_path / "run" / "final_policy.safetensors")
        result = run_sft_subprocess(dict(options, resume="auto"), nproc=2)
        assert result.returncode == 0, child_output(result)
        assert "checkpoint-4 at step 4" in result.stderr
        assert_same_run(tmp_path / "run", reference, weight_tol=1e-5, loss_tol=1e-5)


def _scenario_sft(options_json: str):
    """SFTTrainer on a tiny random Llama; options: output_dir, batch_size, max_steps, save_steps,
    fsdp, use_lora, resume, learning_rate, pause_in_save_at_step (hang inside that checkpoint's
    save after creating <output_dir>/saving.flag, to be killed there)."""
    import json

    from safetensors.torch import save_file

    from fastrlhf.distributed import full_state_dict
    from fastrlhf.roles import RoleModel
    from fastrlhf.testing import tiny_llama, tiny_tokenizer
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    import logging

    logging.basicConfig(level=logging.INFO)  # the trainer's "resumed from ..." line goes to stderr
    opt = json.loads(options_json)
    out = opt["output_dir"]
    pause_step = opt.get("pause_in_save_at_step")
    if pause_step is not None:
        import fastrlhf.checkpoint as checkpoint

        real_save = checkpoint._torch_save

        def slow_save(obj, path):  # the temp dir is half written when this hangs
            if path.name == checkpoint.TRAINER_STATE_FILE and f"checkpoint-{pause_step}-" in path.parent.name:
                open(os.path.join(out, "saving.flag"), "w").close()
                time.sleep(600)
            real_save(obj, path)

        checkpoint._torch_save = slow_save

    ctx = DistContext.from_env()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = RoleModel(tiny_llama(vocab_size=len(tokenizer), seed=0), roles=("policy",),
                      use_lora=opt.get("use_lora", True), lora_r=4)
    config = SFTConfig(
        output_dir=out, batch_size=opt["batch_size"], max_steps=opt["max_steps"], save_steps=opt.get("save_steps", 0),
        learning_rate=opt.get("learning_rate", 3e-3), lr_schedule="cosine", warmup_ratio=0.2, max_grad_norm=1.0,
        seed=0, backend="torch", progress=False, fsdp=opt.get("fsdp", False), resume=opt.get("resume", ""),
        max_length=32, save_final=False,
    )
    trainer = SFTTrainer(model, tokenizer, config, sft_records(), ctx=ctx)
    trainer.train()
    final = full_state_dict(model.role_state_dict("policy"))  # collective under FSDP
    if ctx.is_main:
        save_file({k: v.contiguous() for k, v in final.items()}, os.path.join(out, "final_policy.safetensors"))
    del trainer, model  # they hold the sharded parameters, hence the group (DistContext.close)
    close_and_check(ctx)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_ppo_runs_under_torchrun(tmp_path, fsdp):
    """PPO end to end on 2 gloo ranks: rollouts on every rank (HF generate, synced under FSDP),
    reward role, value role, advantages whitened across ranks, adaptive KL, a checkpoint."""
    import json

    out = tmp_path / "ppo"
    result = run_torchrun([HERE, "ppo", json.dumps({"output_dir": str(out), "fsdp": fsdp})], timeout=240)
    assert result.returncode == 0, child_output(result)
    with open(out / "metrics.jsonl") as f:
        logged = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(all(math.isfinite(v) for v in r.values() if isinstance(v, float)) for r in logged)
    from fastrlhf.checkpoint import load_checkpoint

    _, state = load_checkpoint(out / "checkpoint-2", restore_rng=False)
    assert "kl_controller" in state and state["kl_controller"]["value"] != 0.05  # adaptive KL moved


def _scenario_ppo(options_json: str):
    import json

    from fastrlhf.roles import RoleModel
    from fastrlhf.testing import tiny_llama, tiny_tokenizer
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    opt = json.loads(options_json)
    ctx = DistContext.from_env()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = RoleModel(tiny_llama(vocab_size=len(tokenizer), seed=0), roles=("policy", "value", "reward"),
                      trainable_roles=("policy", "value"), lora_r=2)
    config = PPOConfig(
        output_dir=opt["output_dir"], batch_size=2, max_steps=2, save_steps=2, max_new_tokens=5, ppo_epochs=1,
        num_minibatches=1, adaptive_kl=True, kl_coef=0.05, kl_target=0.01, kl_horizon=10.0, learning_rate=1e-3,
        seed=0, backend="torch", progress=False, fsdp=opt["fsdp"], save_final=False,
    )
    prompts = [{"prompt": r["prompt"]} for r in sft_records(6)]
    PPOTrainer(model, tokenizer, config, prompts, ctx=ctx).train()
    del model  # holds the sharded parameters, hence the group (DistContext.close)
    close_and_check(ctx)


if __name__ == "__main__":
    scenarios = {"collectives": _scenario_collectives, "fail": _scenario_fail, "sft": _scenario_sft,
                 "ppo": _scenario_ppo}
    scenarios[sys.argv[1]](*sys.argv[2:])
