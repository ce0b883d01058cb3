"""Cayley SGD on the orthogonal group (the Stiefel manifold of square matrices), batched over blocks.

The reference (``optimization/stiefel.py:SGDG``, momentum 0) computes, for a parameter ``X`` with gradient ``G``:
``W_hat = (-G^T) X - 1/2 X^T X (-G^T) X``, the skew matrix ``W = W_hat - W_hat^T``, the step
``alpha = min(lr, 1 / (||W||_1 + 1e-8))`` and then the Cayley retraction of ``X^T`` along ``W``:
``Y = (I - alpha/2 W)^-1 (I + alpha/2 W) X^T``, ``X <- Y^T``. The reference approximates the inverse with 5
fixed-point iterations (``cayley="iterative"``); the default here solves it exactly in float64 (``"exact"``), so
the matrices stay orthogonal to float32 precision, and re-orthonormalises (QR with a positive diagonal) only when the
stored float32 matrix drifts beyond ``REORTHO_TOL``.
"""

from __future__ import annotations

import torch

REORTHO_TOL = 1e-6
CAYLEY_MODES = ("exact", "iterative")


def orthogonality_error(q: torch.Tensor) -> float:
    """``max |Q^T Q - I|`` over a batch of square matrices [..., n, n] (computed in float64)."""
    qd = q.detach().double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device)
    return float((qd.transpose(-1, -2) @ qd - eye).abs().max())


def _norm_one(w: torch.Tensor) -> torch.Tensor:
    """Max absolute column sum per matrix, shape [..., 1, 1]."""
    return w.abs().sum(dim=-2, keepdim=True).amax(dim=-1, keepdim=True)


def cayley_step(x: torch.Tensor, grad: torch.Tensor, lr: float, mode: str = "exact") -> torch.Tensor:
    """One descent step of matrices ``x`` [..., n, n] with Euclidean gradient ``grad``; returns the new float32 x."""
    if mode not in CAYLEY_MODES:
        raise ValueError(f"cayley mode must be one of {CAYLEY_MODES}, not {mode!r}")
    xd = x.detach().double()
    xd = xd / xd.norm(dim=-1, keepdim=True)  # rows normalised, as the reference does
    v = -grad.detach().double().transpose(-1, -2)
    mx = v @ xd
    w_hat = mx - 0.5 * (xd.transpose(-1, -2) @ (xd @ mx))
    w = w_hat - w_hat.transpose(-1, -2)
    alpha = torch.clamp(1.0 / (_norm_one(w) + 1e-8), max=lr)
    xt = xd.transpose(-1, -2)
    if mode == "exact":
        eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
        y = torch.linalg.solve(eye - 0.5 * alpha * w, (eye + 0.5 * alpha * w) @ xt)
    else:
        y = xt + alpha * v
        for _ in range(5):
            y = xt + alpha * (w @ (0.5 * (xt + y)))
    new = y.transpose(-1, -2)
    if mode == "exact" and orthogonality_error(new.float()) > REORTHO_TOL:
        new = reorthonormalize(new)
    return new.to(x.dtype)


def reorthonormalize(q: torch.Tensor) -> torch.Tensor:
    """The nearest-in-spirit orthogonal matrix by QR, with the sign of R's diagonal fixed positive (float64)."""
    qq, r = torch.linalg.qr(q.double())
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return qq * signs[..., None, :]
