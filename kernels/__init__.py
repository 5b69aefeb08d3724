"""Triton kernels and their launchers (installed as `fastrlhf.kernels`).

No autograd and no model code here: `fastrlhf.losses` wraps these launchers in autograd.Functions.
Each launcher takes contiguous tensors on one device and returns new tensors.
"""
