"""DeepSMOTE: minority over-sampling in the learned latent space, inside each mini-batch.

Rim+ lesions are rare (typically <10 % of lesions). QSMRim-Net transforms the fused image/radiomic vector
with a small MLP and, during training only, adds for every rim+ sample of the batch k synthetic rim+
samples on the segments joining it to its k nearest rim+ neighbours (Euclidean distance in the
transformed space). The classifier thus sees a balanced-ish batch and gradients flow through both ends
of each segment. Everything is vectorised (cdist + topk), so the cost does not depend on a Python loop.
"""
from __future__ import annotations

import torch
from torch import nn


def interpolate_minority(z: torch.Tensor, labels: torch.Tensor, k: int = 2,
                         generator: torch.Generator | None = None, extra: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Append ``k`` synthetic rim+ samples per rim+ sample of the batch.

    Returns ``(z_out, labels_out, extra_out)`` with ``N + k*n`` rows (n = number of rim+ samples). The synthetic
    rows come after the N originals, ordered by source (rim+ samples in batch order) then by neighbour
    rank: row ``N + i*k + j`` is ``a*z_p[i] + (1-a)*z_p[nn_j(i)]``, ``a ~ U(0, 1)`` drawn per synthetic
    sample. Batches with fewer than ``k + 1`` rim+ samples are returned unchanged (no k neighbours).
    ``extra`` (N, E) rows, when given, are extended with the same sources, neighbours and weights (the
    wide network's features follow their latent vectors).
    """
    pos = torch.nonzero(labels.reshape(-1) == 1).reshape(-1)
    n = int(pos.numel())
    if k < 1 or n < k + 1:
        return z, labels, extra
    zp = z[pos]
    with torch.no_grad():  # neighbour choice is discrete: no gradient through it
        dist = torch.cdist(zp.detach().float(), zp.detach().float())
        dist.fill_diagonal_(float("inf"))  # a sample is not its own neighbour
        nb = dist.topk(k, dim=1, largest=False).indices  # (n, k)
    alpha = torch.rand((n, k, 1), generator=generator, device="cpu" if generator is not None else z.device,
                       dtype=torch.float32).to(device=z.device, dtype=z.dtype)

    def extend(rows: torch.Tensor) -> torch.Tensor:
        """``rows`` followed by its synthetic rows (same sources, neighbours and weights)."""
        src, a = rows[pos], alpha.to(rows.dtype)
        synth = a * src.unsqueeze(1) + (1.0 - a) * src[nb]  # (n, k, D)
        return torch.cat([rows, synth.reshape(n * k, rows.shape[1])], dim=0)

    labels_out = torch.cat([labels, labels.new_ones(n * k)], dim=0)
    return extend(z), labels_out, None if extra is None else extend(extra)


class DeepSMOTE(nn.Module):
    """Latent MLP (two Linear-BatchNorm1d-SiLU blocks) followed by in-batch rim+ interpolation.

    In eval mode, or when no labels are given, only the MLP runs. ``forward`` always returns
    ``(features, labels, extra)`` so callers need not know whether samples were added.
    """

    def __init__(self, dim: int = 512, k: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.k = k
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.SiLU(inplace=True),
            nn.Linear(hidden, dim), nn.BatchNorm1d(dim), nn.SiLU(inplace=True))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, extra: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        z = self.mlp(x)
        if not self.training or labels is None:
            return z, labels, extra
        return interpolate_minority(z, labels, self.k, extra=extra)
