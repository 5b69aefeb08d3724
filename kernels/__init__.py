"""Triton kernels and their launchers (installed as `fastrlhf.kernels`).

No autograd and no model code here: `fastrlhf.losses` wraps these launchers in autograd.Functions.
Each launcher takes tensors on one device and returns new tensors; the [B, T] and [B] launchers
make their inputs contiguous (cheap at those sizes), the log-prob row kernels read strided
[N, V] / [G, R, V] logits in place (see `logprobs.rows_view`). Block sizes: `_launch.py`.
"""
