"""Spread VAE: a deterministic generator trained as a VAE on spread data (seed 001, "Training
models that have zero likelihood"; Zhang, Hayes, Bird, Habib & Barber, "Spread Divergence",
ICML 2020, arXiv 1811.08968, section on deep generative models).

The model x = g(z), z ~ N(0, I) has no density off its manifold, so maximum likelihood is
undefined. Spreading data and model with the same Gaussian noise N(0, sigma^2 I) gives

    p~(y)     = 1/N sum_n N(y; x_n, sigma^2 I)                     (spread data)
    p~_th(y)  = integral N(y; g(z), sigma^2 I) p(z) dz              (spread model)

and KL(p~ || p~_th) = -E_{y ~ p~} log p~_th(y) + const. The spread model is an ordinary latent
variable model with a *fixed* Gaussian decoder N(y; g(z), sigma^2 I), so log p~_th(y) has the
VAE lower bound with an encoder q(z | y) = N(mu(y), diag exp(logvar(y))):

    ELBO(y) = E_q[ log N(y; g(z), sigma^2 I) ] - KL(q(z | y) || N(0, I))
    log N(y; g, sigma^2 I) = -||y - g||^2 / (2 sigma^2) - sum_j log sigma_j - D/2 log 2 pi
    KL(q || N(0, I))       = 1/2 sum_k (mu_k^2 + exp(logvar_k) - 1 - logvar_k)

Training minimises E_{y ~ p~}[-ELBO(y)]: ordinary VAE training with an outer loop that draws
y = x + sigma * eps fresh at every step (fastgen.spread_noise). Every constant is kept (the
decoder term is :func:`fastgen.gaussian_nll_loss` with ``full=True``), so -ELBO is a true upper
bound on -log p~_th(y) in nats, comparable across sigma and models: for the exact posterior the
bound is tight (tests/test_spread_training.py checks it on a linear-Gaussian model, where
p~_th(y) = N(b, W W^T + sigma^2 I) is known). Samples of the trained model are the noiseless
g(z), z ~ N(0, I).

Only Gaussian spread is supported here (the decoder must be the spread kernel; for Laplace
spread use :class:`fastgen.nn.SpreadDivergenceLoss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.gaussian_nll import gaussian_nll_loss
from ..ops.spread_noise import spread_noise

__all__ = ["SpreadVAE", "SpreadVAEOutput", "spread_vae_loss", "gaussian_kl_standard"]


def gaussian_kl_standard(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, in nats: [N, Z] -> [N]."""
    if not isinstance(mu, torch.Tensor) or not isinstance(logvar, torch.Tensor):
        raise TypeError("mu and logvar must be torch.Tensors")
    if mu.shape != logvar.shape or mu.dim() != 2:
        raise ValueError(f"mu and logvar must both be [N, Z], got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


def _sigma_tensor(sigma, D: int | None = None, *, name: str = "sigma") -> torch.Tensor:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got {type(sigma).__name__}")
    s = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
    if s.numel() == 0 or not bool(((s.detach() > 0) & torch.isfinite(s.detach())).all()):
        raise ValueError(f"{name} must be finite and > 0")
    if D is not None and s.numel() not in (1, D):
        raise ValueError(f"{name} must have 1 or D = {D} elements, got shape {tuple(s.shape)}")
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1)


def _loss_terms(r: torch.Tensor, yy: torch.Tensor, mu, logvar, s: torch.Tensor):
    """Per-example (loss, nll, kl) for flattened r, yy [N, D] and a validated sigma (0-d or [D]);
    no host synchronisation."""
    N, D = r.shape
    log_var = (2 * torch.log(s)).reshape(1, 1).expand(N, 1) if s.dim() == 0 else (2 * torch.log(s)).expand(N, D)
    nll = gaussian_nll_loss(r, yy, log_var, full=True, log_var=True, reduction="none").sum(1)
    kl = gaussian_kl_standard(mu, logvar)
    return nll + kl, nll, kl


def spread_vae_loss(recon: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, sigma, *,
                    reduction: str = "mean"):
    """Negative ELBO of the spread VAE, in nats: ``(loss, nll, kl)``.

    Args:
        recon: g(z) for z ~ q(z | y), [N, D] (or [N, ...], flattened). y: spread data, same shape.
        mu, logvar: encoder outputs [N, Z].
        sigma: the spread std (float, 0-d, or D per-dimension values), > 0.
        reduction: "mean" (per example, averaged), "sum" or "none" ([N] each).
    Returns:
        loss = nll + kl; nll = -log N(y; recon, sigma^2 I) with every constant (via
        :func:`fastgen.gaussian_nll_loss`, full=True, log_var=True); kl = KL(q || N(0, I)).
    Raises: TypeError / ValueError naming the argument.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for n, t in (("recon", recon), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{n} must be a floating-point torch.Tensor")
    if recon.shape != y.shape or recon.dim() < 2:
        raise ValueError(f"recon {tuple(recon.shape)} and y {tuple(y.shape)} must have the same shape [N, ...]")
    N = y.shape[0]
    r = recon.reshape(N, -1)
    yy = y.reshape(N, -1)
    D = r.shape[1]
    if mu.shape[0] != N:
        raise ValueError(f"mu must have N = {N} rows, got {tuple(mu.shape)}")
    s = _sigma_tensor(sigma, D).to(device=r.device, dtype=r.dtype)
    loss, nll, kl = _loss_terms(r, yy, mu, logvar, s)
    if reduction == "none":
        return loss, nll, kl
    red = torch.sum if reduction == "sum" else torch.mean
    return red(loss), red(nll), red(kl)


@dataclass
class SpreadVAEOutput:
    """Result of :meth:`SpreadVAE.forward`: loss = nll + kl (nats per example, mean over the
    batch), the spread data y, and the reconstruction g(z)."""
    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    y: torch.Tensor
    recon: torch.Tensor


class SpreadVAE(torch.nn.Module):
    """A deterministic generator trained as a VAE on Gaussian-spread data (seed 001).

    Args:
        generator: module z [n, Z] -> x [n, D] (the deterministic model g; any output shape
            [n, ...] with D features in all).
        encoder: module y [n, D] (the data's own shape) -> (mu, logvar), each [n, Z], or one
            tensor [n, 2 Z] split in halves.
        sigma: spread std (float > 0, or D per-dimension values). Fixed: it defines the
            divergence being minimised (a larger sigma is an easier, coarser objective).
        latent_dim: Z (needed by :meth:`sample`).

    forward(x, generator=None) -> SpreadVAEOutput: spreads x with fresh noise
    (fastgen.spread_noise, seeded by ``generator``), encodes, draws one reparametrised z
    (the same generator), decodes, returns the negative ELBO. Minimise ``out.loss``.

    Raises: TypeError / ValueError for bad arguments.
    """

    def __init__(self, generator: torch.nn.Module, encoder: torch.nn.Module, sigma, *, latent_dim: int):
        super().__init__()
        if not isinstance(generator, torch.nn.Module) or not isinstance(encoder, torch.nn.Module):
            raise TypeError("generator and encoder must be torch.nn.Modules")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
        self.generator = generator
        self.encoder = encoder
        self.latent_dim = latent_dim
        self.register_buffer("sigma", _sigma_tensor(sigma).detach().clone().float())

    def encode(self, y: torch.Tensor):
        out = self.encoder(y)
        if isinstance(out, (tuple, list)):
            mu, logvar = out
        else:
            if out.shape[-1] != 2 * self.latent_dim:
                raise ValueError(f"encoder output must be (mu, logvar) or [n, 2 * latent_dim = {2 * self.latent_dim}], "
                                 f"got {tuple(out.shape)}")
            mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar

    def _sigma_for(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sigma.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        if s.dim() == 0:
            return s
        D = x[0].numel()
        if s.numel() != D:
            raise ValueError(f"sigma has {s.numel()} elements but the data have D = {D} features")
        return s.reshape(x.shape[1:])

    def elbo_terms(self, y: torch.Tensor, generator: torch.Generator | None = None):
        """(loss, nll, kl, recon) per example ([N]) for already-spread data y."""
        mu, logvar = self.encode(y)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = self.generator(z)
        if recon.shape != y.shape:
            recon = recon.reshape(y.shape)
        N = y.shape[0]
        s = self.sigma.to(device=y.device, dtype=y.dtype)
        loss, nll, kl = _loss_terms(recon.reshape(N, -1), y.reshape(N, -1), mu, logvar, s.reshape(-1) if s.dim() else s)
        return loss, nll, kl, recon

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> SpreadVAEOutput:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        if x.dim() < 2:
            raise ValueError(f"x must be [N, ...] with a batch dim, got shape {tuple(x.shape)}")
        y = spread_noise(x, self._sigma_for(x), kind="gaussian", generator=generator)
        loss, nll, kl, recon = self.elbo_terms(y, generator)
        return SpreadVAEOutput(loss.mean(), nll.mean(), kl.mean(), y, recon)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n noiseless model samples g(z), z ~ N(0, I)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        dev = self.sigma.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=dev)
        return self.generator(z)

    def extra_repr(self) -> str:
        s = self.sigma
        return f"sigma={s.item():.4g}" if s.numel() == 1 else f"sigma=[{s.numel()}]"

