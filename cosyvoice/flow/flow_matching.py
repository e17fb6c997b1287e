"""Conditional flow matching at inference: Euler steps of the estimator's velocity field from noise to
mel, with classifier-free guidance (``cosyvoice.flow.flow_matching.ConditionalCFM`` in config.yaml).

Differences from the original, none of which changes the result for the same noise:
- the conditional and unconditional estimator passes run as one batch of 2B;
- the noise comes from the caller (``noise=`` or ``generator=``); the original reseeded the global RNG
  with 42 on every call (:func:`original_noise` reproduces that draw without touching global state);
- :meth:`solve` is free of host synchronisation, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cosyvoice.flow.decoder import ConditionalDecoder

ORIGINAL_NOISE_SEED = 42
"""The seed the original ConditionalCFM set before drawing its starting noise, on every call."""


def original_noise(shape: tuple[int, ...] | torch.Size, device=None, dtype=torch.float32) -> torch.Tensor:
    """The starting noise the original drew (``torch.manual_seed(42); randn_like(mu)``), from a private generator."""
    generator = torch.Generator(device=device).manual_seed(ORIGINAL_NOISE_SEED)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _param(params: Any, name: str, default: Any = None) -> Any:
    if isinstance(params, Mapping):
        return params.get(name, default)
    return getattr(params, name, default)


class ConditionalCFM(nn.Module):
    """Holds the estimator (``decoder.estimator.*`` keys) and the solver settings from ``cfm_params``
    (sigma_min, solver 'euler', t_scheduler 'cosine', inference_cfg_rate; training-only fields kept)."""

    def __init__(
        self,
        in_channels: int,
        cfm_params: Any,
        n_spks: int = 1,
        spk_emb_dim: int = 64,
        estimator: ConditionalDecoder | None = None,
    ):
        super().__init__()
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = _param(cfm_params, "solver", "euler")
        if self.solver != "euler":
            raise NotImplementedError(f"solver {self.solver!r} is not supported (the published decoder uses 'euler')")
        self.sigma_min = float(_param(cfm_params, "sigma_min", 1e-4))  # training only; YAML 1.1 reads 1e-06 as text
        self.t_scheduler = _param(cfm_params, "t_scheduler", "linear")
        if self.t_scheduler not in ("cosine", "linear"):
            raise NotImplementedError(f"t_scheduler {self.t_scheduler!r} is not supported")
        self.training_cfg_rate = _param(cfm_params, "training_cfg_rate", 0.0)
        self.inference_cfg_rate = float(_param(cfm_params, "inference_cfg_rate", 0.0))
        if estimator is None:
            raise ValueError("ConditionalCFM needs an estimator")
        self.estimator = estimator

    def time_span(self, n_timesteps: int, device=None) -> torch.Tensor:
        t_span = torch.linspace(0, 1, n_timesteps + 1, device=device)
        if self.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        return t_span

    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        n_timesteps: int,
        temperature: float = 1.0,
        spks: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """mu (B, 80, T), mask (B, 1, T) -> mel (B, 80, T). Starting noise: ``noise`` if given, else
        drawn from ``generator`` (else the global RNG); scaled by ``temperature``."""
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        elif noise.shape != mu.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(mu.shape)}")
        z = noise.to(device=mu.device, dtype=mu.dtype) * temperature
        return self.solve(z, mu, mask, spks, cond, self.time_span(n_timesteps, device=mu.device))

    def euler_times(self, t_span: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(t, dt) of each Euler step with the original's arithmetic (t advanced by dt, dt re-derived
        from t_span), as 0-d tensors."""
        steps = []
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, t_span.shape[0]):
            steps.append((t, dt))
            t = t + dt
            if step < t_span.shape[0] - 1:
                dt = t_span[step + 1] - t
        return steps

    def time_conditioning(self, t_span: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """The estimator's time conditioning for every step (depends only on t_span)."""
        return [self.estimator.time_conditioning(t) for t, _ in self.euler_times(t_span)]

    def step_tables(self, t_span: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything a step needs that depends on its index only, as tables with one entry per step:
        (t (S,), dt (S,), each part of the time conditioning (S, ...)). A step reads its entry with
        ``index_select`` on the device, so CUDA graphs replay steps without host work in between."""
        times = self.euler_times(t_span)
        conds = [self.estimator.time_conditioning(t) for t, _ in times]
        return (
            torch.stack([t for t, _ in times]),
            torch.stack([dt for _, dt in times]),
            *(torch.cat(parts) for parts in zip(*conds)),  # each part (1, C) per step -> (S, C)
        )

    def solve(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor | None,
        spks: torch.Tensor | None,
        cond: torch.Tensor | None,
        t_span: torch.Tensor,
        padded: bool = False,
        time_conds: list[tuple[torch.Tensor, ...]] | None = None,
        estimator: Callable[..., torch.Tensor] | None = None,
        between_steps: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Fixed-step Euler from x (noise) over ``t_span``; with guidance rate r the velocity is
        (1+r)·v(x | mu, spks, cond) − r·v(x | 0, 0, 0), both passes in one batch. ``mask`` None: all
        frames valid. The estimator runs in its own parameter dtype; the ODE state stays float32.
        ``estimator`` replaces ``self.estimator`` as the callable (e.g. a compiled one).
        ``between_steps()`` is called after every step but the last (other work may run there)."""
        times = self.euler_times(t_span)
        if time_conds is None:
            time_conds = [self.estimator.time_conditioning(t) for t, _ in times]
        for index, ((t, dt), time_cond) in enumerate(zip(times, time_conds)):
            x = self.euler_step(x, mu, mask, spks, cond, t, dt, time_cond, padded=padded, estimator=estimator)
            if between_steps is not None and index + 1 < len(times):
                between_steps()
        return x

    def euler_step(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor | None,
        spks: torch.Tensor | None,
        cond: torch.Tensor | None,
        t: torch.Tensor,
        dt: torch.Tensor,
        time_cond: tuple[torch.Tensor, ...] | None = None,
        padded: bool = False,
        estimator: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One step of :meth:`solve`: x (B, 80, T) float32 at time t -> x at t + dt (``t`` and ``dt`` 0-d:
        every row at the same time)."""
        dtype = next(self.estimator.parameters()).dtype
        rate = self.inference_cfg_rate
        guided = rate > 0
        batch = x.shape[0]

        def prepared(a: torch.Tensor | None) -> torch.Tensor | None:
            if a is None:
                return None
            a = a.to(dtype)
            return torch.cat([a, torch.zeros_like(a)]) if guided else a

        mask_in = None if mask is None else (torch.cat([mask, mask]) if guided else mask).to(dtype)
        x_in = x.to(dtype)
        if guided:
            x_in = torch.cat([x_in, x_in])  # (2B, 80, T): conditional rows, then unconditional
        run = self.estimator if estimator is None else estimator
        velocity = run(
            x_in, mask_in, prepared(mu), t, prepared(spks), prepared(cond), padded=padded, time_cond=time_cond
        )
        velocity = velocity.float()
        if guided:
            velocity = (1.0 + rate) * velocity[:batch] - rate * velocity[batch:]
        return x + dt * velocity
