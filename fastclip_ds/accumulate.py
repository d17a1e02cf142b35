"""Exact gradient accumulation for global and compositional losses: cached features, replayed forwards.

The loss always sees the whole global batch (GradCache / Inf-CLIP style). With ``A = train.micro_batch_size``
micro-batches per rank and step:

* pass 1 (:meth:`FeatureCache.forward`) encodes each micro-batch without autograd, saving the RNG state (CPU and,
  on CUDA, the device's) before each one; the loss runs once on the concatenated local features, so a
  FastCLIP loss makes exactly one u / τ update and one set of collectives per global step, as without
  accumulation. The images stay in memory (augmentation happened in the data loader, nothing is re-decoded);
* the returned ``backward(loss)`` takes the gradient of the loss with respect to the local features and
  ``logit_scale`` (the loss's own backward: OpenCLIP's reduce-scatter happens here, once), then (pass 2)
  re-encodes each micro-batch WITH autograd under its saved RNG state (dropout and any model randomness see
  the same draws as in pass 1) and back-propagates ``Σ features · cached_grad`` through the engine, the
  ``logit_scale`` term once. DeepSpeed's accumulation boundary is False for all but the last micro-batch, so
  ZeRO-0/1 reduce the gradients once, after the last one (ZeRO-2/3 partition gradients, so DeepSpeed
  reduce-scatters each micro-batch's into its partition by design); the caller makes one ``engine.step``.
  Afterwards the RNG is where pass 1 left it, as after one forward of the whole batch.

The sum of the micro-batches' parameter gradients is the chain rule of the whole-batch loss, so the update
equals the one without accumulation up to float rounding (``tests/test_accumulation.py``). The cost is one more
forward per micro-batch; the peak activation memory is one micro-batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

RngState = tuple[Tensor, Tensor | None]


def rng_state(device: torch.device) -> RngState:
    """The CPU RNG state and, on CUDA, the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: RngState, device: torch.device) -> None:
    cpu, accel = state
    torch.set_rng_state(cpu)
    if accel is not None:
        torch.cuda.set_rng_state(accel, device)


class FeatureCache:
    """Feature-cached accumulation over ``steps`` micro-batches per rank on a DeepSpeed ``engine`` (or any module
    returning open_clip's output dict, with ``backward`` and ``set_boundary`` standing in for the engine's)."""

    def __init__(
        self,
        engine: Any,
        loss_fn: Callable[..., dict[str, Tensor]],
        steps: int,
        device: torch.device,
        backward: Callable[[Tensor], Any] | None = None,
        set_boundary: Callable[[bool], None] | None = None,
    ) -> None:
        self.engine, self.loss_fn, self.steps, self.device = engine, loss_fn, steps, device
        self.backward = backward or (lambda surrogate: engine.backward(surrogate, scale_wrt_gas=False))
        self.set_boundary = set_boundary or engine.set_gradient_accumulation_boundary

    def forward(
        self, images: Tensor, tokens: Tensor, keys: Tensor
    ) -> tuple[dict[str, Tensor], Callable[[Tensor], None]]:
        """Pass 1 and the loss of the whole local batch: ``(loss result, backward)``; ``backward(result["loss"])``
        runs pass 2 (call it on every rank or on none: the loss's backward may hold collectives)."""
        if images.shape[0] % self.steps:
            raise ValueError(f"a batch of {images.shape[0]} does not split into {self.steps} micro-batches")
        micro = images.shape[0] // self.steps
        chunks = [slice(i * micro, (i + 1) * micro) for i in range(self.steps)]
        states, image_features, text_features = [], [], []
        with torch.no_grad():
            for rows in chunks:
                states.append(rng_state(self.device))
                out = self.engine(image=images[rows], text=tokens[rows])
                image_features.append(out["image_features"])
                text_features.append(out["text_features"])
        after = rng_state(self.device)
        x = torch.cat(image_features).requires_grad_()
        t = torch.cat(text_features).requires_grad_()
        scale = out["logit_scale"].detach().requires_grad_()
        result = self.loss_fn(x, t, scale, keys)

        def backward(loss: Tensor) -> None:
            dx, dt, dscale = torch.autograd.grad(loss, [x, t, scale], allow_unused=True)
            dx = torch.zeros_like(x) if dx is None else dx
            dt = torch.zeros_like(t) if dt is None else dt
            for i, rows in enumerate(chunks):
                set_rng_state(states[i], self.device)
                self.set_boundary(i == self.steps - 1)
                out = self.engine(image=images[rows], text=tokens[rows])
                surrogate = (out["image_features"] * dx[rows]).sum() + (out["text_features"] * dt[rows]).sum()
                if dscale is not None and out["logit_scale"].requires_grad:
                    once = dscale if i == 0 else torch.zeros_like(dscale)  # every micro-batch gets a (zero) gradient
                    surrogate = surrogate + (out["logit_scale"] * once).sum()
                self.backward(surrogate)
            set_rng_state(after, self.device)

        return result, backward
