"""token_logprobs / logprobs_from_logits: Triton path vs PyTorch reference vs a float64 closed form.

Tolerances (relative to max(1, |expected|.max()) of each compared tensor):
  fp32 inputs: 2e-5 for values and gradients.
  bf16 inputs: values 2e-5 too (both paths upcast the exact bf16 numbers and compute in fp32);
               gradients 2e-2 (they are returned in bf16: d logits and d hidden are rounded).
"""
import subprocess
import sys

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastrlhf import logprobs_from_logits, token_logprobs
from fastrlhf import twins
from fastrlhf.kernels.logprobs import logprobs_backward, logprobs_forward

IGNORE = -100
BACKENDS = ["triton", "torch"]
VALUE_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------- float64 closed form


def closed_form(logits, targets, temperature, grad_logps, grad_entropy, softcap=None):
    """Independent float64 formulas: logp, entropy and d(sum g·logp + gh·entropy)/d logits.

    d logp / d z_j = 1[j=y] - p_j;  d entropy / d z_j = -p_j (log p_j + entropy);  z = cap(logits) / T,
    cap(x) = c tanh(x / c) with d cap / dx = 1 - tanh²(x / c) (cap(x) = x without softcap).
    """
    x, dcap = logits.double(), 1.0
    if softcap:
        tanh = torch.tanh(x / softcap)
        x, dcap = softcap * tanh, 1 - tanh**2
    z = x / temperature
    shift = z.max(-1, keepdim=True).values
    log_p = z - (shift + (z - shift).exp().sum(-1, keepdim=True).log())
    p = log_p.exp()
    keep = targets != IGNORE
    safe = targets.clamp(min=0)
    logps = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
    entropy = -(p * log_p).sum(-1) * keep
    onehot = torch.nn.functional.one_hot(safe, logits.shape[-1]).double()
    dz = grad_logps.double().unsqueeze(-1) * (onehot - p) - grad_entropy.double().unsqueeze(-1) * p * (
        log_p + entropy.unsqueeze(-1)
    )
    return logps, entropy, dz / temperature * dcap * keep.unsqueeze(-1)


def assert_close(actual, expected, tol, what=""):
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def make_targets(shape, V, device):
    targets = torch.randint(0, V, shape, device=device)
    targets.view(-1)[1] = IGNORE  # always one ignored position
    return targets


def run_from_logits(logits, targets, temperature, return_entropy, backend, g, gh, **kwargs):
    """Forward + backward of sum(g·logps + gh·entropy); returns (logps, entropy or None, dlogits)."""
    x = logits.detach().clone().requires_grad_()
    out = logprobs_from_logits(x, targets, temperature=temperature, return_entropy=return_entropy, backend=backend,
                               **kwargs)
    logps, entropy = out if return_entropy else (out, None)
    loss = (logps * g).sum() + ((entropy * gh).sum() if return_entropy else 0)
    loss.backward()
    return logps.detach(), None if entropy is None else entropy.detach(), x.grad


# --------------------------------------------------------------------------- the math itself


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_closed_form_gradients_match_float64_autograd(softcap):
    logits = torch.randn(5, 11, dtype=torch.float64) * 3
    targets = torch.tensor([0, IGNORE, 10, 4, 4])
    g, gh = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    capped = softcap * torch.tanh(x / softcap) if softcap else x
    log_p = torch.log_softmax(capped / 0.7, -1)
    keep = (targets != IGNORE).double()
    logp = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    ((logp * g + entropy * gh) * keep).sum().backward()
    ref_logps, ref_entropy, ref_grad = closed_form(logits, targets, 0.7, g, gh, softcap)
    torch.testing.assert_close(ref_grad, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_logps, logp.detach() * keep, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_entropy, entropy.detach() * keep, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- logprobs_from_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", [131, 1000])
def test_logprobs_from_logits_matches_reference_and_closed_form(V, temperature, return_entropy, dtype, device):
    logits = (torch.randn(3, 5, V, device=device) * 4).to(dtype)
    targets = make_targets((3, 5), V, device)
    g, gh = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    exp_logps, exp_entropy, exp_grad = closed_form(logits, targets, temperature, g, gh if return_entropy else 0 * gh)
    for backend in BACKENDS:
        logps, entropy, grad = run_from_logits(logits, targets, temperature, return_entropy, backend, g, gh)
        assert logps.dtype == torch.float32 and logps.shape == targets.shape and grad.dtype == dtype
        assert (logps <= 0).all()
        assert_close(logps, exp_logps, VALUE_TOL[dtype], f"{backend} logps")
        if return_entropy:
            assert_close(entropy, exp_entropy, VALUE_TOL[dtype], f"{backend} entropy")
        assert_close(grad, exp_grad, GRAD_TOL[dtype], f"{backend} dlogits")
        assert (grad.view(-1, V)[1] == 0).all(), "ignored row must get exactly zero gradient"


def test_logprobs_from_logits_single_token_rows(device):
    logits = torch.randn(4, 1, 37, device=device)  # T = 1
    targets = torch.tensor([[3], [IGNORE], [36], [0]], device=device)
    g = torch.randn(4, 1, device=device)
    exp_logps, exp_entropy, exp_grad = closed_form(logits, targets, 1.0, g, torch.zeros_like(g))
    logps, entropy, grad = run_from_logits(logits, targets, 1.0, True, "triton", g, torch.zeros_like(g))
    assert logps.shape == (4, 1)
    assert_close(logps, exp_logps, 2e-5)
    assert_close(entropy, exp_entropy, 2e-5)
    assert_close(grad, exp_grad, 2e-5)


def test_kernel_streams_many_vocab_blocks(device):
    """BLOCK_V = 64 over V = 1000: 16 online-merge steps per row, with -inf (masked) vocab entries."""
    V = 1000
    logits = torch.randn(6, V, device=device) * 5
    logits[2, ::3] = float("-inf")
    logits[4, :500] = float("-inf")  # the first blocks are entirely -inf
    targets = torch.tensor([0, IGNORE, 1, 999, 700, 64], device=device)
    g, gh = torch.randn(6, device=device), torch.randn(6, device=device)
    logps, lse, entropy = logprobs_forward(logits, targets, temperature=1.3, compute_entropy=True, block_v=64)
    dlogits = logprobs_backward(logits, targets, lse, entropy, g, gh, temperature=1.3, block_v=64)
    finite = torch.where(torch.isinf(logits), torch.full_like(logits, -1e30), logits)  # exp() = 0 in fp64
    exp_logps, exp_entropy, exp_grad = closed_form(finite, targets, 1.3, g, gh)
    assert_close(logps, exp_logps, 2e-5, "logps")
    assert_close(entropy, exp_entropy, 2e-5, "entropy")
    assert_close(dlogits, exp_grad, 2e-5, "dlogits")
    # in place: the gradient may overwrite the logits it is computed from
    inplace = logits.clone()
    logprobs_backward(inplace, targets, lse, entropy, g, gh, temperature=1.3, block_v=64, out=inplace)
    assert torch.equal(inplace, dlogits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_logits_view_is_read_in_place(dtype, device):
    """`logits[:, :-1]` (the usual next-token shift) cannot be flattened to [N, V] without copying
    all of it; the kernels read it as [B, T-1, V] rows of a strided view instead."""
    from fastrlhf.kernels.logprobs import rows_view

    full = (torch.randn(3, 6, 131, device=device) * 3).to(dtype)
    shifted = full[:, :-1]
    rows = rows_view(shifted)
    assert rows.shape == (3, 5, 131) and rows.data_ptr() == full.data_ptr(), "copied instead of viewed"
    assert rows_view(full).shape == (18, 131) and rows_view(full).data_ptr() == full.data_ptr()
    targets = make_targets((3, 5), 131, device)
    g, gh = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    exp_logps, exp_entropy, exp_grad = closed_form(shifted, targets, 0.8, g, gh)
    x = full.detach().clone().requires_grad_()
    logps, entropy = logprobs_from_logits(x[:, :-1], targets, temperature=0.8, return_entropy=True, backend="triton")
    ((logps * g).sum() + (entropy * gh).sum()).backward()
    assert_close(logps, exp_logps, VALUE_TOL[dtype], "logps")
    assert_close(entropy, exp_entropy, VALUE_TOL[dtype], "entropy")
    assert_close(x.grad[:, :-1], exp_grad, GRAD_TOL[dtype], "dlogits")
    assert (x.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(3,), ()])
def test_next_token_layout_equals_slicing_the_logits(backend, dtype, lead, device):
    """logits [..., T+1, V] with targets [..., T] is exactly logits[..., :-1, :] with the same
    targets: values, entropy and the gradient (zero at the last position)."""
    T, V = 5, 131
    full = (torch.randn(*lead, T + 1, V, device=device) * 3).to(dtype)
    targets = make_targets((*lead, T), V, device)
    g, gh = torch.randn(*lead, T, device=device), torch.randn(*lead, T, device=device)
    exp_logps, exp_entropy, exp_grad = closed_form(full[..., :-1, :], targets, 0.8, g, gh)
    x = full.detach().clone().requires_grad_()
    logps, entropy = logprobs_from_logits(x, targets, temperature=0.8, return_entropy=True, backend=backend)
    ((logps * g).sum() + (entropy * gh).sum()).backward()
    assert logps.shape == entropy.shape == targets.shape
    assert_close(logps, exp_logps, VALUE_TOL[dtype], "logps")
    assert_close(entropy, exp_entropy, VALUE_TOL[dtype], "entropy")
    assert x.grad.shape == full.shape
    assert_close(x.grad[..., :-1, :], exp_grad, GRAD_TOL[dtype], "dlogits")
    assert (x.grad[..., -1, :] == 0).all()


class AllocatedBytes(TorchDispatchMode):
    """Ops seen and the bytes of every new storage, during backward."""

    def __init__(self):
        super().__init__()
        self.ops, self.sizes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.sizes += [t.untyped_storage().nbytes() for t in pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_next_token_layout_backward_allocates_one_logits_sized_gradient(device):
    """Slicing logits[:, :-1] first makes autograd's slice_backward allocate a second logits-sized
    zero tensor and copy the gradient into it (2x the memory, 3x the bytes written). The next-token
    layout writes the [B, T+1, V] gradient once."""
    B, T, V = 2, 16, 1000
    full_bytes = B * (T + 1) * V * 4
    targets = torch.randint(0, V, (B, T), device=device)
    counts = {}
    for layout in ("sliced", "next-token"):
        x = torch.randn(B, T + 1, V, device=device, requires_grad=True)
        logps = logprobs_from_logits(x[:, :-1] if layout == "sliced" else x, targets, backend="triton")
        mode = AllocatedBytes()
        with mode:
            logps.sum().backward()
        counts[layout] = sum(size >= 0.9 * B * T * V * 4 for size in mode.sizes)
        if layout == "next-token":
            assert not any("slice_backward" in op for op in mode.ops), mode.ops
            assert max(mode.sizes) == full_bytes
    assert counts == {"sliced": 2, "next-token": 1}, counts


HUGE_OFFSET_SCRIPT = r"""
import os, sys
device = sys.argv[1]
if device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
import torch
from fastrlhf import logprobs_from_logits
from fastrlhf.kernels.logprobs import logprobs_backward, logprobs_forward

V = 257
try:  # 4 GiB (on CPU: of address space; only the few pages the rows live on are ever touched)
    buffer = torch.empty(2**31 + 2 * V, dtype=torch.bfloat16, device=device)
except RuntimeError as err:
    print(err); sys.exit(77)

def check(view, targets):
    compact = view.float()
    expected = torch.log_softmax(compact, -1).gather(-1, targets.view(compact.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    logps, lse, entropy = logprobs_forward(view, targets)
    assert torch.allclose(logps.view(expected.shape), expected, atol=1e-5), (logps, expected)
    grad = logprobs_backward(view, targets, lse, None, torch.ones_like(logps), None)
    expected_grad = torch.nn.functional.one_hot(targets, V).view(compact.shape) - compact.softmax(-1)
    assert torch.allclose(grad.float(), expected_grad, atol=1e-2)
    logprobs_backward(view, targets, lse, None, torch.ones_like(logps), None, out=view)  # in place
    assert torch.equal(view, grad)

# [N, V] rows 2**30 apart: row 2 starts at element 2**31 (row * stride wraps in int32).
rows = buffer.as_strided((3, V), (2**30, 1))
rows.copy_(torch.randn(3, V))
check(rows, torch.tensor([5, 100, 256], device=device))
# [G, R, V] groups: group 1, row 1 starts at (2**31 - 2**20) + 2**20 = 2**31.
groups = buffer.as_strided((2, 2, V), (2**31 - 2**20, 2**20, 1))
groups.copy_(torch.randn(2, 2, V))
check(groups, torch.tensor([0, 7, 200, 256], device=device))
targets = torch.tensor([[0, 7], [200, 256]], device=device)
logps = logprobs_from_logits(groups, targets, backend="triton")  # the public path keeps the view
expected = torch.log_softmax(groups.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
assert torch.allclose(logps, expected, atol=1e-5)
print("ok")
"""


def test_row_offsets_past_int32_range(device):
    """Row offsets are int64: rows that start 2**31 elements in (N * V passes that at 14k rows
    of a 152k vocabulary) are read and written where they are. The interpreter computes with
    numpy int32 just like the GPU, so an int32 `row * stride` wraps to a negative offset here
    (and typically segfaults): hence the subprocess. On a GPU it runs the compiled kernels."""
    result = subprocess.run([sys.executable, "-c", HUGE_OFFSET_SCRIPT, device], capture_output=True, text=True,
                            timeout=600)
    if result.returncode == 77:
        pytest.skip(f"cannot reserve 4 GiB of address space: {result.stdout.strip()}")
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-3000:])


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_give_nan_not_zero(backend, softcap, device):
    """The clamp logp <= 0 must not turn a NaN row into logp 0 (Triton's default min drops NaN),
    nor may the soft-cap's tanh turn a NaN logit into a number."""
    logits = torch.randn(3, 50, device=device)
    logits[1, 7] = float("nan")
    logps, entropy = logprobs_from_logits(logits, torch.tensor([1, 2, 3], device=device), return_entropy=True,
                                          softcap=softcap, backend=backend)
    assert logps[1].isnan() and entropy[1].isnan()
    assert logps[[0, 2]].isfinite().all() and entropy[[0, 2]].isfinite().all()


def test_out_of_range_target_gives_nan_not_a_crash(device):
    """On CUDA the value range is not checked on the host; the kernel must not read out of bounds."""
    logits = torch.randn(3, 50, device=device)
    logps, _, _ = logprobs_forward(logits, torch.tensor([5, 50, -7], device=device))
    assert torch.isfinite(logps[0]) and logps[1:].isnan().all()


# --------------------------------------------------------------------------- token_logprobs


def head(V, H, dtype, device, bias):
    hidden = (torch.randn(2, 7, H, device=device)).to(dtype)
    weight = (torch.randn(V, H, device=device) * H**-0.5 * 3).to(dtype)
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def run_token_logprobs(hidden, weight, bias, targets, backend, g, gh, shift=False, **kwargs):
    """shift: `hidden` is [B, T + 1, H] and its strided view hidden[:, :-1] goes in."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    x = leaves[0][:, :-1] if shift else leaves[0]
    out = token_logprobs(x, leaves[1], targets, bias=leaves[2], backend=backend, **kwargs)
    logps, entropy = out if kwargs.get("return_entropy") else (out, None)
    ((logps * g).sum() + ((entropy * gh).sum() if entropy is not None else 0)).backward()
    grads = [None if t is None else t.grad for t in leaves]
    if shift:
        assert (grads[0][:, -1] == 0).all()
        grads[0] = grads[0][:, :-1]
    return logps.detach(), entropy, grads


def expected_token_logprobs(hidden, weight, bias, targets, temperature, g, gh, softcap=None):
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    logits = h @ w.T + (0 if bias is None else bias.double())
    logps, entropy, dlogits = closed_form(logits, targets.reshape(-1), temperature, g.reshape(-1), gh.reshape(-1),
                                          softcap)
    grads = [(dlogits @ w).reshape(hidden.shape), dlogits.T @ h, None if bias is None else dlogits.sum(0)]
    return logps.reshape(targets.shape), entropy.reshape(targets.shape), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.6, True)])
@pytest.mark.parametrize("V", [131, 1000])
def test_token_logprobs_matches_reference_and_closed_form(V, temperature, bias, return_entropy, dtype, device):
    hidden, weight, b = head(V, 16, dtype, device, bias)
    targets = make_targets((2, 7), V, device)
    g, gh = torch.randn(2, 7, device=device), torch.randn(2, 7, device=device)
    gh = gh if return_entropy else torch.zeros_like(gh)
    exp_logps, exp_entropy, exp_grads = expected_token_logprobs(hidden, weight, b, targets, temperature, g, gh)
    for backend in BACKENDS:
        # chunk_size 5 over 14 rows: three chunks, the last one short
        logps, entropy, grads = run_token_logprobs(
            hidden, weight, b, targets, backend, g, gh,
            temperature=temperature, return_entropy=return_entropy, chunk_size=5,
        )
        assert logps.dtype == torch.float32 and logps.shape == targets.shape
        assert (logps <= 0).all()
        assert_close(logps, exp_logps, VALUE_TOL[dtype], f"{backend} logps")
        if return_entropy:
            assert_close(entropy, exp_entropy, VALUE_TOL[dtype], f"{backend} entropy")
        for name, grad, expected, source in zip(("hidden", "weight", "bias"), grads, exp_grads, (hidden, weight, b)):
            if source is None:
                continue
            assert grad.dtype == source.dtype and grad.shape == source.shape
            assert_close(grad, expected, GRAD_TOL[dtype], f"{backend} d{name}")
        assert (grads[0].reshape(-1, 16)[1] == 0).all(), "ignored row must get exactly zero gradient"


# --------------------------------------------------------------------------- backward over vocab tiles


def spy_path(monkeypatch, force=None):
    """Records which backward path token_logprobs takes (True = vocab tiles) in the returned list;
    `force` ("vocab" / "rows") overrides the choice."""
    from fastrlhf.losses import logprobs as fused

    taken, choose = [], fused._backward_over_vocab

    def spy(n_rows, vocab, need_weight):
        over_vocab = choose(n_rows, vocab, need_weight) if force is None else force == "vocab"
        taken.append(over_vocab)
        return over_vocab

    monkeypatch.setattr(fused, "_backward_over_vocab", spy)
    return taken


def test_backward_path_choice():
    from fastrlhf.losses.logprobs import _backward_over_vocab, _vocab_tile

    assert _backward_over_vocab(4096, 151936, need_weight=True)
    assert not _backward_over_vocab(4096, 151936, need_weight=False)  # frozen head: no accumulator
    assert not _backward_over_vocab(151936, 151936, need_weight=True)
    # 256 MiB of fp32 logits: [16384, 4096] tiles; at least 128 wide, at most V, multiples of 128.
    assert _vocab_tile(16384, 151936, 256 * 2**20) == 4096
    assert _vocab_tile(37, 1000, 4 * 1000 * 4) == 128
    assert _vocab_tile(10**6, 151936, 256 * 2**20) == 128
    assert _vocab_tile(3, 1000, 256 * 2**20) == 1000


# (hidden shape, V, path): N = 36 < V = 1000 with chunk_size 4 gives vocab tiles of 128, i.e.
# 8 tiles, the last one 104 wide; "shifted" is hidden[:, :-1] of [4, 10, H] (a strided view);
# N = 150 >= V = 131 keeps the row path.
TILE_CASES = {"vocab": ((36,), 1000, True), "vocab-shifted": ((4, 9), 1000, True), "rows": ((150,), 131, False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.6, True)])
@pytest.mark.parametrize("case", sorted(TILE_CASES))
def test_token_logprobs_backward_paths_match_closed_form(case, temperature, bias, return_entropy, dtype, device,
                                                          monkeypatch):
    lead, V, over_vocab = TILE_CASES[case]
    H, shift = 16, case == "vocab-shifted"
    full = torch.randn(*lead[:-1], lead[-1] + shift, H, device=device).to(dtype)
    hidden = full[:, :-1] if shift else full
    weight = (torch.randn(V, H, device=device) * H**-0.5 * 3).to(dtype)
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    targets = make_targets(lead, V, device)
    targets.view(-1)[-1] = V - 1  # a target in the ragged last tile
    g, gh = torch.randn(lead, device=device), torch.randn(lead, device=device)
    gh = gh if return_entropy else torch.zeros_like(gh)
    exp_logps, exp_entropy, exp_grads = expected_token_logprobs(hidden, weight, b, targets, temperature, g, gh)
    taken = spy_path(monkeypatch)
    for backend in BACKENDS:
        logps, entropy, grads = run_token_logprobs(
            full, weight, b, targets, backend, g, gh, shift=shift,
            temperature=temperature, return_entropy=return_entropy, chunk_size=4,
        )
        assert_close(logps, exp_logps, VALUE_TOL[dtype], f"{backend} logps")
        if return_entropy:
            assert_close(entropy, exp_entropy, VALUE_TOL[dtype], f"{backend} entropy")
        for name, grad, expected, source in zip(("hidden", "weight", "bias"), grads, exp_grads, (hidden, weight, b)):
            if source is not None:
                assert grad.dtype == source.dtype and grad.shape == source.shape
                assert_close(grad, expected, GRAD_TOL[dtype], f"{backend} d{name}")
        assert (grads[0].reshape(-1, H)[1] == 0).all(), "ignored row must get exactly zero gradient"
    assert taken == [over_vocab], "the triton backend must take the path this case is meant to test"


def test_vocab_tiles_fully_ignored_batch(device, monkeypatch):
    hidden, weight, b = head(1000, 4, torch.float32, device, bias=True)
    taken = spy_path(monkeypatch)
    g = torch.ones(2, 7, device=device)
    logps, entropy, grads = run_token_logprobs(hidden, weight, b, torch.full((2, 7), IGNORE, device=device), "triton",
                                               g, g, return_entropy=True, chunk_size=1)
    assert taken == [True]  # 14 rows x 1000 with a budget of one row: 8 tiles of 128
    assert (logps == 0).all() and (entropy == 0).all()
    assert all((grad == 0).all() for grad in grads)


class Allocations(TorchDispatchMode):
    """Records (shape, dtype) of every new tensor storage made by an op (views are not)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.made += [(tuple(t.shape), t.dtype) for t in pytree.tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("path", ["vocab", "rows"])
def test_vocab_tiles_allocate_no_fp32_weight_gradient(path, device, monkeypatch):
    """bf16 head: the vocab-tile backward writes the weight gradient in bf16 slice by slice; the
    fp32 [V, H] accumulator of the row path (checked here too, so the test can see one) is gone."""
    V, H = 1000, 16
    hidden, weight, _ = head(V, H, torch.bfloat16, device, bias=False)
    hidden.requires_grad_(), weight.requires_grad_()
    spy_path(monkeypatch, force=path)
    logps = token_logprobs(hidden, weight, make_targets((2, 7), V, device), chunk_size=4, backend="triton")
    mode = Allocations()
    with mode:
        logps.sum().backward()
    fp32_weight_sized = [m for m in mode.made if m[1] == torch.float32 and torch.Size(m[0]).numel() >= V * H]
    assert bool(fp32_weight_sized) == (path == "rows"), (path, fp32_weight_sized)
    assert weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_vocab_tile_kernel_variants_compile_for_sm90(softcap, device, monkeypatch, tmp_path):
    """Vocab tiles narrower than the vocabulary (large N, and the ragged last tile: 384 wide at
    V = 151936, N = 16384) launch the backward kernel with BLOCK_V < 4096, variants the
    full-vocabulary calls of tests/test_gpu_compile.py never reach; with HAS_SOFTCAP too (a tanh
    per element, forward and backward). fp32 and bf16 compile for sm_90 without spills and within
    the 128 registers that test allows."""
    from gpu_compile import compile_for_cuda, recorded_launches
    from fastrlhf.losses import logprobs as fused

    N, H, V = 5, 16, 2 * 4096 + 384
    with recorded_launches() as launches, torch.device(device):
        for width in (4096, 1024, 128):  # tiles of `width`, the last one 384 (or none) wide
            for name in ("CHUNK_BYTES_CPU", "CHUNK_BYTES_CUDA"):
                monkeypatch.setattr(fused, name, 4 * N * width)
            for dtype in (torch.float32, torch.bfloat16):
                hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
                weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
                logps, entropy = token_logprobs(hidden, weight, torch.randint(0, V, (N,)), return_entropy=True,
                                                softcap=softcap, backend="triton")
                (logps + entropy).sum().backward()
    assert all(dict(launch.constexprs)["HAS_SOFTCAP"] == bool(softcap) for launch in launches)
    blocks = {dict(launch.constexprs)["BLOCK_V"] for launch in launches if launch.kernel == "_logprobs_backward_kernel"}
    assert blocks == {4096, 1024, 512, 128}, blocks
    usage = compile_for_cuda(launches, tmp_path)
    assert not [u for u in usage if u["local"] or u["stack"]], usage
    assert max(u["reg"] for u in usage) <= 128, usage


# --------------------------------------------------------------------------- logit soft-capping


def capped_logits(shape, dtype, device):
    """Raw logits spread over [-100, 100]: far past c = 5 and 30, where tanh saturates."""
    return (torch.rand(shape, device=device) * 200 - 100).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("layout", ["rows", "next-token"])
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap_logprobs_from_logits_matches_reference_and_closed_form(softcap, layout, return_entropy, dtype,
                                                                        device):
    """z = c·tanh(x / c) / T, read both as [..., V] rows and as next-token [..., T+1, V] logits."""
    T, V, temperature = 5, 131, 0.7
    full = capped_logits((3, T + 1, V), dtype, device)
    logits = full if layout == "next-token" else full[:, :-1].contiguous()
    targets = make_targets((3, T), V, device)
    g, gh = torch.randn(3, T, device=device), torch.randn(3, T, device=device)
    gh = gh if return_entropy else torch.zeros_like(gh)
    exp_logps, exp_entropy, exp_grad = closed_form(full[:, :-1], targets, temperature, g, gh, softcap)
    for backend in BACKENDS:
        logps, entropy, grad = run_from_logits(logits, targets, temperature, return_entropy, backend, g, gh,
                                               softcap=softcap)
        assert (logps <= 0).all() and grad.shape == logits.shape and grad.dtype == dtype
        assert_close(logps, exp_logps, VALUE_TOL[dtype], f"{backend} logps")
        if return_entropy:
            assert_close(entropy, exp_entropy, VALUE_TOL[dtype], f"{backend} entropy")
        assert_close(grad[:, :T], exp_grad, GRAD_TOL[dtype], f"{backend} dlogits")
        if layout == "next-token":
            assert (grad[:, -1] == 0).all()
    # the cap bites: without it the values are far off
    assert (closed_form(full[:, :-1], targets, temperature, g, gh)[0] - exp_logps).abs().max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("case", sorted(TILE_CASES))
def test_softcap_token_logprobs_backward_paths_match_closed_form(case, softcap, return_entropy, dtype, device,
                                                                 monkeypatch):
    """Both backward paths (row chunks, vocab tiles incl. the ragged last one) apply the cap's
    derivative; temperature 0.6 divides after the cap; hidden, weight and bias gradients."""
    lead, V, over_vocab = TILE_CASES[case]
    H, shift, temperature = 16, case == "vocab-shifted", 0.6
    full = torch.randn(*lead[:-1], lead[-1] + shift, H, device=device).to(dtype)
    hidden = full[:, :-1] if shift else full
    weight = (torch.randn(V, H, device=device) * H**-0.5 * 40).to(dtype)  # |logits| up to ~100+
    b = (torch.randn(V, device=device) * 5).to(dtype)
    targets = make_targets(lead, V, device)
    targets.view(-1)[-1] = V - 1  # a target in the ragged last tile
    g, gh = torch.randn(lead, device=device), torch.randn(lead, device=device)
    gh = gh if return_entropy else torch.zeros_like(gh)
    exp_logps, exp_entropy, exp_grads = expected_token_logprobs(hidden, weight, b, targets, temperature, g, gh, softcap)
    taken = spy_path(monkeypatch)
    for backend in BACKENDS:
        logps, entropy, grads = run_token_logprobs(
            full, weight, b, targets, backend, g, gh, shift=shift,
            temperature=temperature, return_entropy=return_entropy, chunk_size=4, softcap=softcap,
        )
        assert_close(logps, exp_logps, VALUE_TOL[dtype], f"{backend} logps")
        if return_entropy:
            assert_close(entropy, exp_entropy, VALUE_TOL[dtype], f"{backend} entropy")
        for name, grad, expected, source in zip(("hidden", "weight", "bias"), grads, exp_grads, (hidden, weight, b)):
            assert grad.dtype == source.dtype and grad.shape == source.shape
            assert_close(grad, expected, GRAD_TOL[dtype], f"{backend} d{name}")
        assert (grads[0].reshape(-1, H)[1] == 0).all(), "ignored row must get exactly zero gradient"
    assert taken == [over_vocab], "the triton backend must take the path this case is meant to test"


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_off_values_and_infinite_logits(backend, device):
    """softcap None and 0 are the same uncapped result; ±inf raw logits cap to ±c, as in the model
    (a -inf logit is no longer masked out once capped)."""
    V, c = 50, 5.0
    logits = torch.randn(3, V, device=device) * 20
    targets = torch.tensor([1, 2, 3], device=device)
    plain = logprobs_from_logits(logits, targets, backend=backend)
    assert torch.equal(plain, logprobs_from_logits(logits, targets, softcap=0, backend=backend))
    assert torch.equal(plain, logprobs_from_logits(logits, targets, softcap=None, backend=backend))
    logits[0, 4], logits[2, 9] = float("inf"), float("-inf")
    logps, entropy = logprobs_from_logits(logits, targets, softcap=c, return_entropy=True, backend=backend)
    exp_logps, exp_entropy, _ = closed_form(logits, targets, 1.0, torch.zeros(3), torch.zeros(3), c)
    assert torch.isfinite(logps).all() and torch.isfinite(entropy).all()
    assert_close(logps, exp_logps, 2e-5, "logps")
    assert_close(entropy, exp_entropy, 2e-5, "entropy")


def test_token_logprobs_large_prime_vocab(device):
    """V = 32003 (prime, not a multiple of any block size) with few rows."""
    V, H = 32003, 8
    hidden = torch.randn(3, H, device=device)
    weight = torch.randn(V, H, device=device)
    targets = torch.tensor([0, 32002, 17777], device=device)
    g, gh = torch.randn(3, device=device), torch.randn(3, device=device)
    exp_logps, exp_entropy, exp_grads = expected_token_logprobs(hidden, weight, None, targets, 1.0, g, gh)
    logps, entropy, grads = run_token_logprobs(hidden, weight, None, targets, "triton", g, gh, return_entropy=True)
    assert_close(logps, exp_logps, 2e-5, "logps")
    assert_close(entropy, exp_entropy, 2e-5, "entropy")
    assert_close(grads[0], exp_grads[0], 2e-5, "dhidden")
    assert_close(grads[1], exp_grads[1], 2e-5, "dweight")
    # the same vocab through logprobs_from_logits
    logits = hidden @ weight.T
    out, out_entropy, _ = run_from_logits(logits, targets, 1.0, True, "triton", g, gh)
    assert_close(out, exp_logps, 2e-5, "from logits")
    assert_close(out_entropy, exp_entropy, 2e-5, "from logits entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_autocast(backend, device):
    """LoRA case: weight frozen (only hidden gets a gradient), called under bf16 autocast. Autocast
    must not re-cast the matmuls (fp32 inputs keep fp32 precision, forward = recomputed backward)."""
    hidden, weight, _ = head(131, 16, torch.float32, device, bias=False)
    targets = make_targets((2, 7), 131, device)
    g = torch.randn(2, 7, device=device)
    exp_logps, _, exp_grads = expected_token_logprobs(hidden, weight, None, targets, 1.0, g, torch.zeros_like(g))
    x = hidden.clone().requires_grad_()
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        logps = token_logprobs(x, weight, targets, chunk_size=4, backend=backend)
    (logps * g).sum().backward()  # outside autocast, as PyTorch recommends
    assert weight.grad is None
    assert_close(logps.detach(), exp_logps, 2e-5, "logps")
    assert_close(x.grad, exp_grads[0], 2e-5, "dhidden")
    with torch.no_grad():
        assert_close(token_logprobs(hidden, weight, targets, backend=backend), exp_logps, 2e-5, "no_grad logps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite_and_nonpositive(backend, device):
    """Logits of scale 1e4: no NaN/inf, logp <= 0 (0 exactly for a dominant target), entropy >= 0."""
    V = 131
    logits = torch.randn(5, V, device=device) * 1e4
    logits[0, 7] = 1e5  # dominant target: logp must be exactly 0, never positive
    targets = torch.tensor([7, 3, IGNORE, 100, 130], device=device)
    g, gh = torch.randn(5, device=device), torch.randn(5, device=device)
    logps, entropy, grad = run_from_logits(logits, targets, 0.5, True, backend, g, gh)
    for t in (logps, entropy, grad):
        assert torch.isfinite(t).all()
    assert (logps <= 0).all() and logps[0] == 0 and (entropy >= 0).all()
    exp_logps, exp_entropy, exp_grad = closed_form(logits, targets, 0.5, g, gh)
    # fp32 of numbers ~2e4: absolute error ~1e-3 is all the format can give
    torch.testing.assert_close(logps.double(), exp_logps, rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(entropy.double(), exp_entropy, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad.double(), exp_grad, rtol=0, atol=1e-4)
    # through the linear head as well
    hidden = torch.randn(5, 4, device=device) * 100
    weight = torch.randn(V, 4, device=device) * 100
    lp, ent, grads = run_token_logprobs(hidden, weight, None, targets, backend, g, gh, return_entropy=True)
    assert (lp <= 0).all() and (ent >= 0).all()
    assert all(torch.isfinite(t).all() for t in (lp, ent, *grads[:2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_ignored_and_empty_batches(backend, device):
    hidden, weight, b = head(50, 4, torch.float32, device, bias=True)
    all_ignored = torch.full((2, 7), IGNORE, device=device)
    g = torch.ones(2, 7, device=device)
    logps, entropy, grads = run_token_logprobs(hidden, weight, b, all_ignored, backend, g, g, return_entropy=True)
    assert (logps == 0).all() and (entropy == 0).all()
    assert all((grad == 0).all() for grad in grads)
    empty_targets = torch.zeros(0, 3, dtype=torch.long, device=device)
    logps, entropy, grads = run_token_logprobs(
        hidden[:0, :3], weight, b, empty_targets, backend, torch.zeros(0, 3, device=device),
        torch.zeros(0, 3, device=device), return_entropy=True,
    )
    assert logps.shape == (0, 3) and entropy.shape == (0, 3)
    assert grads[0].shape == (0, 3, 4) and (grads[1] == 0).all() and (grads[2] == 0).all()
    out, _, dlogits = run_from_logits(torch.zeros(0, 9, device=device), torch.zeros(0, dtype=torch.long, device=device),
                                      1.0, False, backend, torch.zeros(0, device=device), None)
    assert out.shape == (0,) and dlogits.shape == (0, 9)


@pytest.mark.parametrize("junk", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", ["vocab", "rows"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_with_non_finite_hidden_give_no_gradient(backend, path, junk, device, monkeypatch):
    """A -100 target means "no gradient" even when its hidden row is NaN/inf (e.g. padding of a
    diverged or uninitialised position): every gradient equals that of the batch with the row at 0."""
    hidden, weight, b = head(40 if path == "vocab" else 9, 8, torch.float32, device, bias=True)
    targets = make_targets((2, 7), weight.shape[0], device)
    targets[0, 2] = targets[1, 5] = IGNORE
    g, gh = torch.randn(2, 7, device=device), torch.randn(2, 7, device=device)
    clean = hidden.clone()
    clean[0, 2] = clean[1, 5] = 0.0
    junked = hidden.clone()
    junked[0, 2] = junk
    junked[1, 5, 3] = -junk
    if backend == "triton":
        spy_path(monkeypatch, force=path)
    expected = run_token_logprobs(clean, weight, b, targets, backend, g, gh, return_entropy=True, chunk_size=4)
    logps, entropy, grads = run_token_logprobs(junked, weight, b, targets, backend, g, gh, return_entropy=True,
                                               chunk_size=4)
    torch.testing.assert_close(logps, expected[0])
    torch.testing.assert_close(entropy, expected[1])
    for name, grad, want in zip(("hidden", "weight", "bias"), grads, expected[2]):
        assert torch.isfinite(grad).all(), f"d{name} is not finite"
        torch.testing.assert_close(grad, want, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_logits_rows_with_non_finite_values_give_zero_gradient(backend, device):
    logits = torch.randn(4, 6, 50, device=device)
    targets = make_targets((4, 5), 50, device)
    targets[1, 3] = IGNORE
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")  # the last position of the next-token layout scores nothing
    g = torch.randn(4, 5, device=device)
    logps, entropy, dlogits = run_from_logits(logits, targets, 1.0, True, backend, g, g)
    assert torch.isfinite(logps).all() and torch.isfinite(entropy).all()
    assert torch.isfinite(dlogits).all()
    assert (dlogits[1, 3] == 0).all() and (dlogits[:, -1] == 0).all()


# --------------------------------------------------------------------------- gradcheck (reference)


def test_gradcheck_reference_float64():
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 6, IGNORE], [3, 3, 1]])
    assert torch.autograd.gradcheck(
        lambda x: twins.logprobs_from_logits(x, targets, temperature=0.8, return_entropy=True), (logits,)
    )
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    flat_targets = targets.reshape(-1)[:5]
    assert torch.autograd.gradcheck(
        lambda h, w, b: twins.token_logprobs(
            h, w, flat_targets, bias=b, temperature=1.5, return_entropy=True, chunk_size=2
        ),
        (hidden, weight, bias),
    )


def test_gradcheck_reference_softcap_float64():
    """The twin's soft-cap in float64, on logits past the cap (c = 2, |x| up to ~6)."""
    logits = (torch.randn(2, 4, 7, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.tensor([[0, 6, IGNORE], [3, 3, 1]])  # next-token layout: [2, 3+1, 7] logits
    assert torch.autograd.gradcheck(
        lambda x: twins.logprobs_from_logits(x, targets, temperature=0.8, return_entropy=True, softcap=2.0),
        (logits,),
    )
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(7, 3, dtype=torch.float64) * 2).requires_grad_()
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: twins.token_logprobs(
            h, w, targets.reshape(-1)[:5], bias=b, temperature=1.5, return_entropy=True, chunk_size=2, softcap=2.0
        ),
        (hidden, weight, bias),
    )


# --------------------------------------------------------------------------- bad input


def bad_token_logprobs_calls():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    return {
        "float targets": dict(targets=t.float()),
        "bool targets": dict(targets=t > 3),
        "targets shape": dict(targets=t[:3]),
        "targets >= V": dict(targets=torch.tensor([0, 1, 10, 2])),
        "negative target": dict(targets=torch.tensor([0, -1, 2, 2])),
        "hidden 1-D": dict(hidden=h[0]),
        "integer hidden": dict(hidden=h.long()),
        "H mismatch": dict(weight=torch.randn(10, 7)),
        "weight dtype": dict(weight=w.double()),
        "bias shape": dict(bias=torch.randn(9)),
        "temperature 0": dict(temperature=0.0),
        "negative temperature": dict(temperature=-1.0),
        "chunk_size 0": dict(chunk_size=0),
        "chunk_size float": dict(chunk_size=2.5),
        "negative softcap": dict(softcap=-30.0),
        "nan softcap": dict(softcap=float("nan")),
        "inf softcap": dict(softcap=float("inf")),
        "string softcap": dict(softcap="30"),
        "bool softcap": dict(softcap=True),
        "unknown backend": dict(backend="cuda"),
    }, dict(hidden=h, weight=w, targets=t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(bad_token_logprobs_calls()[0]))
def test_token_logprobs_rejects_bad_input(case, backend):
    overrides, good = bad_token_logprobs_calls()
    kwargs = {"backend": backend, **good, **overrides[case]}
    hidden, weight, targets = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets")
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, targets, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_rejects_bad_input(backend):
    logits, targets = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    for bad_logits, bad_targets, kwargs in [
        (logits.long(), targets, {}),
        (logits, targets.float(), {}),
        # (targets[:, :2] is the next-token layout, valid: test_next_token_layout_*)
        (logits, targets[:, :1], {}),  # neither one per row nor the next-token layout
        (logits[:, :2], targets, {}),  # targets longer than the logits
        (logits, targets[:1, :2], {}),
        (logits, targets + 10, {}),
        (logits, targets, {"temperature": 0.0}),
        (torch.randn(2, 3, 0), targets, {}),
    ]:
        with pytest.raises(ValueError):
            logprobs_from_logits(bad_logits, bad_targets, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf"), float("-inf"), "30", True, torch.tensor(30.0)])
def test_bad_softcap_is_rejected_by_name(softcap, backend):
    logits, targets = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="softcap"):
        logprobs_from_logits(logits, targets, softcap=softcap, backend=backend)
    with pytest.raises(ValueError, match="softcap"):
        token_logprobs(torch.randn(4, 8), torch.randn(10, 8), targets.reshape(-1)[:4], softcap=softcap,
                       backend=backend)


# --------------------------------------------------------------------------- memory: never N x V


class LargestAllocation(TorchDispatchMode):
    """Records the largest new tensor storage (bytes) produced by any op, separately for each
    phase. Views share their input's storage and are not allocations: they are skipped."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.largest = {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest[self.phase] = max(self.largest[self.phase], t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backend,path", [("triton", "vocab"), ("triton", "rows"), ("torch", None)])
def test_token_logprobs_never_allocates_n_by_v(backend, path, device, monkeypatch):
    """Largest allocation <= one fp32 chunk of logits, and the same for 4x more rows: on both
    backward paths of the Triton backend (vocab tiles of N x Vc with N x Vc = chunk x V, or row
    chunks of chunk x V)."""
    V, H, chunk = 2048, 4, 8  # H < chunk: [V, H] weight gradients stay below one chunk;
    chunk_bytes = chunk * V * 4  # and 128 x N <= chunk x V: vocab tiles stay >= 128 wide
    weight = torch.randn(V, H, device=device, requires_grad=True)
    taken = spy_path(monkeypatch, force=path)
    largest = []
    for n_rows in (32, 128):
        hidden = torch.randn(n_rows, H, device=device, requires_grad=True)
        targets = torch.randint(0, V, (n_rows,), device=device)
        assert n_rows * V * 4 >= 4 * chunk_bytes  # an N x V tensor would be caught
        mode = LargestAllocation()
        with mode:
            logps, entropy = token_logprobs(hidden, weight, targets, chunk_size=chunk, return_entropy=True, backend=backend)
            mode.phase = "backward"
            (logps.sum() + entropy.sum()).backward()
        assert mode.largest["forward"] >= chunk_bytes and mode.largest["backward"] >= chunk_bytes, mode.largest
        assert max(mode.largest.values()) <= chunk_bytes + 4096, (n_rows, mode.largest)
        largest.append(mode.largest)
    assert largest[0] == largest[1], f"allocation grew with N: {largest}"
    assert taken == ([path == "vocab"] * 2 if backend == "triton" else [])


def test_token_logprobs_reads_shifted_hidden_without_copying_it(device):
    """`hidden[:, :-1]` (how RoleModel calls it) does not flatten to [N, H]: rows are taken chunk by
    chunk (chunks here span sequence boundaries), never as one N x H copy."""
    B, T, H, V, chunk = 4, 33, 64, 131, 5
    full = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) * H**-0.5 * 3
    targets = make_targets((B, T - 1), V, device)
    g, gh = torch.randn(B, T - 1, device=device), torch.randn(B, T - 1, device=device)
    exp_logps, exp_entropy, exp_grads = expected_token_logprobs(full[:, :-1], weight, None, targets, 1.0, g, gh)
    h, w = full.clone().requires_grad_(), weight.clone().requires_grad_()
    mode = LargestAllocation()
    with mode:
        logps, entropy = token_logprobs(h[:, :-1], w, targets, chunk_size=chunk, return_entropy=True, backend="triton")
    assert mode.largest["forward"] < B * (T - 1) * H * 4 // 4, mode.largest  # no N x H copy
    ((logps * g).sum() + (entropy * gh).sum()).backward()
    assert_close(logps, exp_logps, 2e-5, "logps")
    assert_close(entropy, exp_entropy, 2e-5, "entropy")
    assert_close(h.grad[:, :-1], exp_grads[0], 2e-5, "d hidden")
    assert (h.grad[:, -1] == 0).all()
    assert_close(w.grad, exp_grads[1], 2e-5, "d weight")
