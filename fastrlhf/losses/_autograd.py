"""What the Triton losses' autograd.Functions share: their backward is first-order only.

The fused kernels compute d loss / d input in closed form (in the forward, or in a backward kernel);
that derivative is not itself differentiable. Under `create_graph=True` (gradient penalties,
Hessian-vector products) autograd would otherwise record only the multiply by the incoming
gradient and silently drop every second-order term of the kernel. `first_order_only` makes any
attempt to differentiate through such a backward raise instead, naming the function and the
way out (the PyTorch twin, `backend="torch"`, is differentiable to any order).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.autograd import function as _function


def first_order_only(public_name: str) -> Callable:
    """Decorator for `autograd.Function.backward`: runs it without recording a graph and, when
    autograd builds one (`create_graph=True`), returns gradients whose own backward raises a
    RuntimeError naming `public_name` (as torch's `once_differentiable`, with a message that says
    what to do). An ordinary backward is unaffected."""
    message = (
        f"fastrlhf.{public_name} on the Triton backend has no second derivative (its fused kernel "
        f"gives the first derivative in closed form). Differentiating through its gradient "
        f"(create_graph=True: gradient penalties, Hessian-vector products) needs backend='torch'."
    ).encode()

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # an ordinary backward (create_graph=False)
                return grads
            # Poisoned even when the incoming grads are constants (loss = logps.sum()): a plain
            # tensor here would make a gradient penalty's own gradient silently zero.
            as_tuple = grads if isinstance(grads, tuple) else (grads,)
            delayed = _function._functions.DelayedError(message, len(as_tuple))

            def poisoned(grad):
                if grad is None:
                    return None
                grad = grad.detach()
                grad.requires_grad = True
                return grad

            out = delayed(*[poisoned(g) for g in as_tuple])
            out = out if isinstance(out, tuple) else (out,)
            return out if isinstance(grads, tuple) else out[0]

        return wrapper

    return decorate
