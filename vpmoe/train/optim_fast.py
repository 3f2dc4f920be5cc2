"""A fast, host-sync-free step for `vpmoe.train.optim.MuonAdamW`: same state, same math.

`FastMuonAdamW(opt, max_grad_norm)` wraps a MuonAdamW; `step()` equals
`torch.nn.utils.clip_grad_norm_(params, max_grad_norm); opt.step()` (up to rounding), reading and
writing the same `opt.state` entries, so checkpoints and the reference step stay interchangeable.

Design choices:
- Gradient clipping is folded in: the global norm comes from `_foreach_norm` (no host sync) and the
  clip factor multiplies the gradient where the step reads it, instead of a separate pass that
  rewrites every gradient (for 6B fp32 params that pass alone moves 48 GB).
- Muon on the routed experts' 3-D tensors `[E, m, n]` runs in chunks of `ns_chunk` matrices: one
  fused kernel (torch.compile) does momentum, Nesterov and the bf16 cast; Newton-Schulz runs
  batched on the chunk (bf16, one GEMM per iteration over the big operand, see
  `newton_schulz_batched`); one fused kernel applies weight decay and the update. Measured on an
  H200 (bench/RESULTS.md, optimizer sweep): whole tensors (256 matrices) beat L2-sized chunks
  (32-64), eager and in a CUDA graph alike, so 256 is the default.
- Muon on 2-D matrices: same-shape matrices are stacked and orthogonalised in one batched call;
  momentum and updates use `_foreach` ops (few launches for hundreds of small tensors).
- AdamW: `torch._fused_adamw_` (one multi-tensor kernel per group) with the clip factor passed as
  its `grad_scale` and `step` kept as a device tensor.
- Learning rates live in 0-dim device tensors (`lr_tensors`), so the whole step can be captured in a
  CUDA graph and still follow a schedule: `step()` refreshes them from `group["lr"]` (a device
  fill, no sync); a captured step reads them.
- On CPU (CI) the same code runs eagerly in fp32; DTensor (FSDP/EP) params are not handled here:
  `supported(opt)` says whether to use this or the reference step.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor

from vpmoe.train.optim import NS_COEFFS, MuonAdamW, muon_scale


def newton_schulz_batched(x: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """`optim.newton_schulz` for a batch [b, m, n] already in the iteration dtype, with fewer passes
    over the big [b, m, n] operand (the [b, m, m] Gram-side work is small):
    - each iteration is X <- Q @ X with Q = a*I + b*G + c*G@G: one GEMM, no separate `a*X + ...`
      pass and no copy of X into a `baddbmm` accumulator;
    - the Frobenius normalisation comes from the first Gram matrix (||X||^2 = trace(X X^T)) and is
      folded into the first Q, so X is never divided in a separate pass;
    - for tall matrices the last product is taken transposed (X^T Q^T), so the result comes out
      contiguous in the parameter's own layout for the update kernel."""
    a, b, c = NS_COEFFS
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    eye = torch.eye(x.shape[-2], device=x.device, dtype=torch.float32)
    for i in range(steps):
        gram = torch.bmm(x, x.mT)
        if i == 0:
            norm = gram.diagonal(dim1=-2, dim2=-1).float().sum(-1).clamp_min(0).sqrt() + eps  # [b]
            gram = (gram.float() / norm[:, None, None] ** 2).to(x.dtype)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        q = poly.float() + a * eye
        if i == 0:
            q = q / norm[:, None, None]
        q = q.to(x.dtype)
        if transposed and i == steps - 1:
            return torch.bmm(x.mT, q.mT)
        x = torch.bmm(q, x)
    return x.mT if transposed else x


def _muon_pre(g, buf, coef, mu: float, nesterov: bool, out_dtype: torch.dtype):
    """buf <- mu * buf + coef * g (in place); returns the Nesterov (or plain) update in out_dtype."""
    g = g * coef
    buf.mul_(mu).add_(g)
    u = g + mu * buf if nesterov else buf
    return u.to(out_dtype)


def _muon_post(w, ortho, decay, step):
    """w <- w * decay + step * ortho (decay = 1 - lr * wd, step = -lr * scale; 0-dim tensors)."""
    w.mul_(decay).add_(ortho.to(w.dtype) * step)


def supported(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, MuonAdamW) and not any(
        isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])


class FastMuonAdamW:
    def __init__(self, opt: MuonAdamW, max_grad_norm: float = 0.0, ns_chunk: int = 256,
                 compile: bool | None = None):
        if not supported(opt):
            raise ValueError("FastMuonAdamW needs a MuonAdamW over plain (non-DTensor) parameters")
        self.opt, self.max_norm, self.ns_chunk = opt, float(max_grad_norm), int(ns_chunk)
        p0 = opt.param_groups[0]["params"][0]
        self.device = p0.device
        self.ns_dtype = torch.bfloat16 if p0.is_cuda else torch.float32
        self.lr_tensors = [torch.zeros((), device=self.device) for _ in opt.param_groups]
        use_compile = p0.is_cuda if compile is None else compile
        self._pre = _Compiled(_muon_pre, use_compile)
        self._post = _Compiled(_muon_post, use_compile)

    # ------------------------------------------------------------------ state

    def init_state(self) -> None:
        """Create every state tensor the step needs (before a CUDA-graph capture)."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                self._state(group, p)

    def _state(self, group, p):
        state = self.opt.state[p]
        if group["kind"] == "muon":
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p)
        else:
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            if state["step"].device != p.device:  # the reference keeps it on the CPU
                state["step"] = state["step"].to(p.device)
        return state

    def refresh_lr(self) -> None:
        for t, group in zip(self.lr_tensors, self.opt.param_groups):
            t.fill_(group["lr"])

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, refresh_lr: bool = True) -> torch.Tensor:
        """One clipped step; returns the global gradient norm (a device tensor, before clipping)."""
        if refresh_lr:
            self.refresh_lr()
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()) if grads else \
            torch.zeros((), device=self.device)
        if self.max_norm > 0:
            coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        else:
            coef = torch.ones((), device=self.device)
        for group, lr in zip(self.opt.param_groups, self.lr_tensors):
            if group["kind"] == "muon":
                self._muon(group, lr, coef)
            elif group["kind"] == "adamw":
                self._adamw(group, lr, coef)
            else:
                raise ValueError(f"unknown param group kind {group['kind']!r}")
        return norm

    def _muon(self, group, lr, coef) -> None:
        mu, nesterov, wd, steps = group["momentum"], group["nesterov"], group["weight_decay"], group["ns_steps"]
        decay = 1 - lr * wd
        flat2d = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self._state(group, p)["momentum"]
            step = -lr * muon_scale(p.shape)
            if p.ndim == 2:
                flat2d[tuple(p.shape)].append((p, buf))
                continue
            g, w = p.grad.view(-1, *p.shape[-2:]), p.view(-1, *p.shape[-2:])
            buf = buf.view(-1, *p.shape[-2:])
            for c0 in range(0, g.shape[0], self.ns_chunk):
                c1 = min(c0 + self.ns_chunk, g.shape[0])
                u = self._pre(g[c0:c1], buf[c0:c1], coef, mu, nesterov, self.ns_dtype)
                self._post(w[c0:c1], newton_schulz_batched(u, steps), decay, step)
        for shape, items in flat2d.items():
            ps, bufs = [p for p, _ in items], [b for _, b in items]
            scaled = torch._foreach_mul([p.grad for p in ps], coef)
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, scaled)
            upd = torch._foreach_add(scaled, bufs, alpha=mu) if nesterov else bufs
            for c0 in range(0, len(ps), max(1, self.ns_chunk)):
                sl = slice(c0, c0 + max(1, self.ns_chunk))
                ortho = newton_schulz_batched(torch.stack(upd[sl]).to(self.ns_dtype), steps)
                ortho = [o.to(p.dtype) for o, p in zip(ortho.unbind(0), ps[sl])]
                if wd:
                    torch._foreach_mul_(ps[sl], decay)
                torch._foreach_add_(ps[sl], torch._foreach_mul(ortho, -lr * muon_scale(shape)))

    def _adamw(self, group, lr, coef) -> None:
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        states = [self._state(group, p) for p in ps]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        by_dtype = defaultdict(list)
        for p, s, t in zip(ps, states, steps):
            by_dtype[p.dtype].append((p, s, t))
        for items in by_dtype.values():
            torch._fused_adamw_([p for p, _, _ in items], [p.grad for p, _, _ in items],
                                [s["exp_avg"] for _, s, _ in items], [s["exp_avg_sq"] for _, s, _ in items], [],
                                [t for _, _, t in items], lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                maximize=False, grad_scale=1.0 / coef, found_inf=None)


class _Compiled:
    """torch.compile'd on first use where asked; eager forever after any compile failure."""

    def __init__(self, fn, use_compile: bool):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False) if use_compile else None

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - eager is always correct
                warnings.warn(f"optim_fast: compiling {self.fn.__name__} failed ({e!r:.300}); eager from now")
                self.compiled = None
        return self.fn(*args)
