"""Network shapes on 32x32x16 patches, width multiplier, fusion modes, ablation switches, parameter counts."""
from __future__ import annotations

import pytest
import torch

from qsmrim_app.model.config import TrainConfig
from qsmrim_app.model.network import (BasicBlock3D, Fusion, QSMRimNet, RadiomicsMLP, ResNet3D, RimNetLike,
                                      build_network)

PATCH = (32, 32, 16)
IN = 3  # the default inputs ('referenced'): QSM, FLAIR, outline


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet18_feature_maps_are_not_pooled_away() -> None:
    net = ResNet3D(in_channels=2).eval()
    with torch.no_grad():
        maps = net.feature_maps(torch.randn(2, 2, *PATCH))
        vec = net(torch.randn(2, 2, *PATCH))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32, 16), (128, 16, 16, 8), (256, 8, 8, 4),
                                                    (512, 8, 8, 4)]
    assert vec.shape == (2, 512) and net.out_features == 512
    # ResNet-18 layout: 8 basic blocks
    assert sum(isinstance(m, BasicBlock3D) for m in net.modules()) == 8


def test_resnet18_parameter_count() -> None:
    """3D ResNet-18 (3x3x3 kernels, 2-channel 3x3x3 stem): conv weights + BN + projections, exactly."""
    widths, blocks = (64, 128, 256, 512), (2, 2, 2, 2)
    expected = 2 * 64 * 27 + 2 * 64  # stem conv + BN
    c = 64
    for w, _ in zip(widths, blocks):
        for b in range(2):
            cin = c if b == 0 else w
            expected += cin * w * 27 + w * w * 27 + 4 * w
            if b == 0 and cin != w:
                expected += cin * w + 2 * w
        c = w
    assert n_params(ResNet3D(2)) == expected
    assert 33_000_000 < expected < 34_000_000


@pytest.mark.parametrize("w", [0.125, 0.25])
def test_width_multiplier_scales_every_latent(w: float) -> None:
    net = build_network(TrainConfig(width_multiplier=w), n_features=11).eval()
    assert isinstance(net, QSMRimNet)
    assert net.image.out_features == int(512 * w) and net.radiomics.out_features == int(512 * w)
    with torch.no_grad():
        logits, labels = net(torch.randn(3, IN, *PATCH), torch.randn(3, 11))
    assert logits.shape == (3,) and labels is None
    full = n_params(build_network(TrainConfig(), 11))
    assert n_params(net) < full * w  # channels squared: much smaller


def test_radiomics_mlp_layout() -> None:
    mlp = RadiomicsMLP(527)
    layers = [type(m).__name__ for m in mlp.modules() if not isinstance(m, (torch.nn.Sequential, RadiomicsMLP))]
    assert layers == ["Linear", "BatchNorm1d", "SiLU", "Dropout", "Linear", "BatchNorm1d", "SiLU"]
    assert n_params(mlp) == (527 * 1024 + 1024 + 2 * 1024) + (1024 * 512 + 512 + 2 * 512)


def test_fusion_modes() -> None:
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    add = Fusion(8, "add")
    assert torch.equal(add(a, b), a + b) and n_params(add) == 0
    cat = Fusion(8, "concat").eval()
    assert cat(a, b).shape == (4, 8) and n_params(cat) == 16 * 8 + 8 + 2 * 8
    with pytest.raises(ValueError):
        Fusion(8, "multiply")
    cfg = TrainConfig(width_multiplier=0.125, fusion="add")
    assert build_network(cfg, 5).fusion.mode == "add"


def test_training_mode_adds_deepsmote_samples_and_eval_does_not() -> None:
    torch.manual_seed(0)
    net = build_network(TrainConfig(width_multiplier=0.125), 7)
    x, f = torch.randn(12, IN, *PATCH), torch.randn(12, 7)
    y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    net.train()
    logits, labels = net(x, f, y)
    assert logits.shape == (12 + 8,) and int(labels.sum()) == 12
    net.eval()
    with torch.no_grad():
        logits, labels = net(x, f, y)
    assert logits.shape == (12,) and torch.equal(labels, y)


@pytest.mark.parametrize("method, image, radiomics, smote", [
    ("qsmrimnet", True, True, True), ("image-radiomics", True, True, False),
    ("image-only", True, False, False), ("aprl-nn", False, True, False)])
def test_ablation_switches(method: str, image: bool, radiomics: bool, smote: bool) -> None:
    net = build_network(TrainConfig(method=method, width_multiplier=0.125), 9)
    assert (net.image is not None, net.radiomics is not None, net.deepsmote is not None) == (image, radiomics, smote)
    assert (net.fusion is not None) == (image and radiomics)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, IN, *PATCH), torch.randn(2, 9))[0].shape == (2,)


def test_image_branch_ignores_features_and_radiomics_branch_ignores_patches() -> None:
    torch.manual_seed(0)
    img = build_network(TrainConfig(method="image-only", width_multiplier=0.125), 4).eval()
    rad = build_network(TrainConfig(method="aprl-nn", width_multiplier=0.125), 4).eval()
    x, f = torch.randn(3, IN, *PATCH), torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(img(x, f)[0], img(x, torch.randn(3, 4))[0])
        assert torch.equal(rad(x, f)[0], rad(torch.randn(3, IN, *PATCH), f)[0])
        assert not torch.equal(rad(x, f)[0], rad(x, f + 1)[0])


def test_rimnet_like_two_branches() -> None:
    net = RimNetLike(width_multiplier=0.25).eval()
    assert len(net.first) == 2  # one VGG branch per modality
    x = torch.randn(2, IN, *PATCH)
    with torch.no_grad():
        logits, labels = net(x)
        # each modality matters
        x2 = x.clone()
        x2[:, 1] = 0
        assert not torch.allclose(net(x2)[0], logits)
    assert logits.shape == (2,) and labels is None
    assert isinstance(build_network(TrainConfig(method="rimnet"), 0), RimNetLike)


def test_unknown_method_and_empty_network_are_errors() -> None:
    with pytest.raises(ValueError, match="aprl-rf"):
        build_network(TrainConfig(method="aprl-rf"), 5)
    with pytest.raises(ValueError):
        QSMRimNet(5, use_image=False, use_radiomics=False)


def test_gradients_reach_both_branches() -> None:
    torch.manual_seed(1)
    net = build_network(TrainConfig(width_multiplier=0.125), 6).train()
    y = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    logits, labels = net(torch.randn(8, IN, *PATCH), torch.randn(8, 6), y)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float()).backward()
    assert net.image.stem[0].weight.grad.abs().sum() > 0
    assert net.radiomics.net[0][0].weight.grad.abs().sum() > 0


@pytest.mark.shared_data
def test_real_qsm_patches_give_finite_distinct_outputs(shared_data) -> None:
    """Real QSM values (2016 challenge, ppb: hundreds) inside real lesion shapes (Lesjak et al. 2017)."""
    import nibabel as nib
    import numpy as np

    from qsmrim_app.lesions import label_instances
    from qsmrim_app.patches import extract_patches

    folder = shared_data / "open_ms_data" / "patient19"
    mask = np.asarray(nib.load(next(folder.glob("GOLD_STANDARD*.nii.gz"))).dataobj) > 0.5
    chi = np.asarray(nib.load(shared_data / "qsm_challenge_2016" / "chi_cosmos.nii.gz").dataobj, np.float32)
    qsm = np.zeros(mask.shape, np.float32)
    qsm[11:171, 29:189, 11:171] = chi * 1000.0
    inst = label_instances(mask, min_voxels=20)
    ps = extract_patches(qsm, mask.astype(np.float32), inst.labels, inst.lesion_ids[:16], np.eye(4))
    x = torch.from_numpy(TrainConfig().input_spec().network_inputs(ps.patches, np.tile([[0.0, 1.0]], (16, 1))))
    torch.manual_seed(0)
    net = build_network(TrainConfig(method="image-only", width_multiplier=0.25), 0)
    net.train()
    logits, _ = net(x, torch.zeros(len(x), 0))  # one training-mode pass sets BatchNorm statistics
    net.eval()
    with torch.no_grad():
        logits, _ = net(x, torch.zeros(len(x), 0))
    assert logits.shape == (len(x),) and torch.isfinite(logits).all()
    assert float(logits.std()) > 0  # different lesions, different outputs


def test_strided_stem_gives_isotropic_maps_on_the_default_patch() -> None:
    """(2, 2, 1) on 0.75 x 0.75 x 1.5 mm: 1.5 mm isotropic after the stem, every stage still > 1 voxel."""
    net = ResNet3D(3, (8, 16, 32, 64), stem_stride=(2, 2, 1)).eval()
    maps = net.feature_maps(torch.randn(2, 3, 32, 32, 16))
    assert [tuple(m.shape[2:]) for m in maps] == [(16, 16, 16), (8, 8, 8), (4, 4, 4), (4, 4, 4)]


def test_wide_network_starts_as_its_linear_term() -> None:
    """Before training the deep part adds nothing: the logit is exactly the (fitted) linear term."""
    torch.manual_seed(0)
    net = QSMRimNet(n_features=7, in_channels=3, width_multiplier=0.0625, stem_stride=(2, 2, 1), wide=True).eval()
    x, f = torch.randn(4, 3, 16, 16, 8), torch.randn(4, 7)
    with torch.no_grad():
        assert torch.equal(net(x, f)[0], torch.zeros(4))
        net.wide.weight.copy_(torch.arange(7.0).reshape(1, 7))
        net.wide.bias.fill_(0.25)
        assert torch.allclose(net(x, f)[0], f @ torch.arange(7.0) + 0.25, atol=1e-5)
    net.train()
    y = torch.tensor([1, 1, 1, 0])
    logits, labels = net(x, f, y)  # DeepSMOTE's synthetic rim+ rows get their interpolated features
    assert logits.shape == labels.shape == (4 + 6,)
