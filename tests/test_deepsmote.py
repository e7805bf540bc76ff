"""DeepSMOTE: synthetic rim+ samples on segments to true nearest rim+ neighbours, training only."""
from __future__ import annotations

import time

import torch

from qsmrim_app.model.deepsmote import DeepSMOTE, interpolate_minority


def _batch(n: int = 40, d: int = 6, n_pos: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.zeros(n, dtype=torch.long)
    labels[torch.randperm(n, generator=g)[:n_pos]] = 1
    return z, labels


def test_output_size_and_labels() -> None:
    z, y = _batch()
    out, lab, _ = interpolate_minority(z, y, k=2)
    assert out.shape == (40 + 2 * 9, 6) and lab.shape == (58,)
    assert torch.equal(out[:40], z) and torch.equal(lab[:40], y)
    assert bool((lab[40:] == 1).all())


def test_synthetic_points_lie_between_a_rim_positive_and_one_of_its_two_nearest() -> None:
    z, y = _batch(n=50, d=5, n_pos=12, seed=1)
    k = 2
    out, _, _ = interpolate_minority(z, y, k=k, generator=torch.Generator().manual_seed(5))
    pos = z[y == 1]
    dist = torch.cdist(pos, pos)
    dist.fill_diagonal_(float("inf"))
    true_nn = dist.argsort(dim=1)[:, :k]
    synth = out[len(z):].view(len(pos), k, -1)
    for i in range(len(pos)):
        for j in range(k):
            s = synth[i, j]
            # Find the neighbour whose segment from pos[i] contains s: collinear and between the ends.
            found = False
            for cand in range(len(pos)):
                if cand == i:
                    continue
                seg = pos[cand] - pos[i]
                a = float(((s - pos[i]) @ seg) / (seg @ seg))
                if 0 <= a <= 1 and torch.allclose(pos[i] + a * seg, s, atol=1e-10):
                    found = True
                    assert cand in true_nn[i].tolist()
                    assert cand == int(true_nn[i, j])  # ordered by neighbour rank
            assert found


def test_interpolation_weights_are_uniform_per_synthetic_sample() -> None:
    z, y = _batch(n=600, d=4, n_pos=500, seed=3)
    out, _, _ = interpolate_minority(z, y, k=2, generator=torch.Generator().manual_seed(0))
    pos = z[y == 1]
    dist = torch.cdist(pos, pos)
    dist.fill_diagonal_(float("inf"))
    nb = pos[dist.topk(2, largest=False).indices]  # (n, 2, d)
    synth = out[len(z):].view(len(pos), 2, -1)
    # s = a*x + (1-a)*nb  =>  a = <s - nb, x - nb> / |x - nb|^2
    diff = pos[:, None] - nb
    alpha = ((synth - nb) * diff).sum(-1) / (diff * diff).sum(-1)
    assert float(alpha.min()) >= 0 and float(alpha.max()) <= 1
    assert abs(float(alpha.mean()) - 0.5) < 0.05 and abs(float(alpha.std()) - 12 ** -0.5) < 0.03
    assert float((alpha[:, 0] - alpha[:, 1]).abs().mean()) > 0.2  # independent per synthetic sample


def test_fewer_than_three_rim_positive_pass_through() -> None:
    for n_pos in (0, 1, 2):
        z, y = _batch(n_pos=n_pos)
        out, lab, _ = interpolate_minority(z, y, k=2)
        assert out is z and lab is y
    z, y = _batch(n_pos=3)
    assert interpolate_minority(z, y, k=2)[0].shape[0] == 40 + 6


def test_layer_synthesises_only_in_training_mode() -> None:
    torch.manual_seed(0)
    layer = DeepSMOTE(dim=16, k=2)
    x = torch.randn(32, 16)
    y = torch.zeros(32, dtype=torch.long)
    y[:8] = 1
    layer.train()
    out, lab, _ = layer(x, y)
    assert out.shape == (32 + 16, 16) and lab.shape == (48,)
    layer.eval()
    out, lab, _ = layer(x, y)
    assert out.shape == (32, 16) and torch.equal(lab, y)
    out, lab, _ = layer(x)
    assert out.shape == (32, 16) and lab is None


def test_gradients_flow_through_synthetic_samples() -> None:
    layer = DeepSMOTE(dim=8, k=2).train()
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.tensor([1] * 6 + [0] * 10)
    out, _, _ = layer(x, y)
    out[16:].sum().backward()
    assert x.grad is not None and float(x.grad[:6].abs().sum()) > 0


def test_large_batch_is_vectorised_and_fast() -> None:
    z, y = _batch(n=4096, d=512, n_pos=1000, seed=2)
    z = z.float()
    start = time.perf_counter()
    out, lab, _ = interpolate_minority(z, y, k=2)
    elapsed = time.perf_counter() - start
    assert out.shape == (4096 + 2000, 512) and int(lab.sum()) == 3000
    assert elapsed < 2.0, elapsed  # a Python loop over 1000 samples with cdist each would not be


def test_extra_rows_follow_their_latent_sources() -> None:
    """The wide network's features are interpolated with the same sources, neighbours and weights."""
    z, y = _batch(n=24, d=6, n_pos=5, seed=4)
    z = z.float()
    extra = torch.cat([z, 2.0 * z + 1.0], dim=1)  # an affine function of z, row by row
    out, lab, ext = interpolate_minority(z, y, k=2, generator=torch.Generator().manual_seed(1), extra=extra)
    assert ext.shape == (24 + 10, 12) and torch.equal(ext[:24], extra)
    # Interpolation commutes with an affine map: each synthetic extra row is that map of its latent row.
    assert torch.allclose(ext[24:, :6], out[24:], atol=1e-6)
    assert torch.allclose(ext[24:, 6:], 2.0 * out[24:] + 1.0, atol=1e-5)
