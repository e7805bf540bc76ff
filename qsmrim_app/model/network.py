"""QSMRim-Net and its comparators as small PyTorch modules with explicit constructor arguments.

Every network here takes ``(patches, features, labels=None)`` and returns ``(logits, labels)``: one
logit per sample (apply a sigmoid for the rim+ probability; train with ``BCEWithLogitsLoss``, which is
the numerically stable form of sigmoid + binary cross-entropy). ``labels`` comes back extended when
DeepSMOTE added synthetic rim+ samples (training mode only), so the training loop never needs to know
which network it runs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .config import TrainConfig
from .deepsmote import DeepSMOTE

RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET_WIDTHS = (64, 128, 256, 512)
# Strides per stage. A 32x32x16 patch with a 3x3x3 stride-1 stem and no max-pool becomes
# 32x32x16 (layer1) -> 16x16x8 (layer2) -> 8x8x4 (layer3) -> 8x8x4 (layer4, stride 1 as in the
# released QSMRim-Net code), so layer4 still sees an 8x8x4 map before global average pooling.
# ImageNet-style strides (stem 2 + max-pool + 2/2/2) would reduce the 16-slice axis to 1 voxel.
RESNET_STRIDES = (1, 2, 2, 1)


def scaled(width: int, multiplier: float) -> int:
    """A channel count scaled by the width multiplier (at least 4, so tiny test networks still work)."""
    return max(4, int(round(width * multiplier)))


class BasicBlock3D(nn.Module):
    """ResNet basic block in 3D: two 3x3x3 conv-BN, identity (or 1x1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet3D(nn.Module):
    """3D ResNet encoder (ResNet-18 layout by default) ending in global average pooling.

    Stem: 3x3x3 conv, stride 1, no max-pool; stage strides ``RESNET_STRIDES`` (see module constants for
    the resulting feature-map sizes on a 32x32x16 patch). Output: ``(B, widths[-1])``.
    """

    def __init__(self, in_channels: int = 2, widths: Sequence[int] = RESNET_WIDTHS,
                 blocks: Sequence[int] = RESNET18_BLOCKS, strides: Sequence[int] = RESNET_STRIDES,
                 stem_stride: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        if not len(widths) == len(blocks) == len(strides):
            raise ValueError("widths, blocks and strides need one entry per stage")
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, widths[0], 3, stride=tuple(int(v) for v in stem_stride), padding=1, bias=False),
            nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        channels = widths[0]
        for width, n_blocks, stride in zip(widths, blocks, strides):
            layers = [BasicBlock3D(channels, width, stride)]
            layers += [BasicBlock3D(width, width) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_features = channels
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage (used to check that nothing is pooled away)."""
        out = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x).flatten(1)


def linear_block(in_features: int, out_features: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> BatchNorm1d -> SiLU (Swish) [-> Dropout]: the paper's MLP unit."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features),
                               nn.SiLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RadiomicsMLP(nn.Module):
    """Radiomic feature encoder: F -> 1024 (dropout 0.3) -> 512 with BatchNorm and Swish."""

    def __init__(self, in_features: int, hidden: int = 1024, out_features: int = 512,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(linear_block(in_features, hidden, dropout), linear_block(hidden, out_features))
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Fusion(nn.Module):
    """Joins the image and radiomic vectors: concatenation + Linear-BN-SiLU (default) or addition."""

    def __init__(self, dim: int = 512, mode: str = "concat") -> None:
        super().__init__()
        if mode not in ("concat", "add"):
            raise ValueError(f"unknown fusion {mode!r} (concat or add)")
        self.mode = mode
        self.project = linear_block(2 * dim, dim) if mode == "concat" else nn.Identity()

    def forward(self, image: torch.Tensor, radiomics: torch.Tensor) -> torch.Tensor:
        if self.mode == "add":
            return image + radiomics
        return self.project(torch.cat([image, radiomics], dim=1))


class Classifier(nn.Module):
    """512 -> 128 (SiLU, dropout 0.5) -> 1 logit."""

    def __init__(self, in_features: int = 512, hidden: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class QSMRimNet(nn.Module):
    """QSMRim-Net with the paper's ablation switches.

    ``use_image`` / ``use_radiomics`` select the branches (radiomics alone is the APRL-NN comparator);
    ``use_deepsmote`` adds the DeepSMOTE layer (latent MLP + rim+ interpolation) after fusion; without it
    the fused vector goes straight to the classifier. ``wide`` adds a linear term on the features to the
    logit (synthetic DeepSMOTE samples get the same interpolation of their sources' features). All latent
    sizes scale with ``width_multiplier`` (512 * w embedding, 1024 * w radiomic hidden layer, 128 * w
    classifier hidden layer) so that both
    branches always produce vectors of the same size; w = 1 is the paper's network.
    """

    def __init__(self, n_features: int, in_channels: int = 2, use_image: bool = True,
                 use_radiomics: bool = True, use_deepsmote: bool = True, width_multiplier: float = 1.0,
                 fusion: str = "concat", deepsmote_neighbours: int = 2, radiomics_dropout: float = 0.3,
                 classifier_dropout: float = 0.5, stem_stride: Sequence[int] = (1, 1, 1),
                 wide: bool = False) -> None:
        super().__init__()
        if not (use_image or use_radiomics):
            raise ValueError("QSMRimNet needs the image branch, the radiomics branch or both")
        widths = tuple(scaled(w, width_multiplier) for w in RESNET_WIDTHS)
        dim = widths[-1]
        self.image = ResNet3D(in_channels, widths, stem_stride=stem_stride) if use_image else None
        self.radiomics = (RadiomicsMLP(n_features, scaled(1024, width_multiplier), dim, radiomics_dropout)
                          if use_radiomics else None)
        self.fusion = Fusion(dim, fusion) if (use_image and use_radiomics) else None
        self.deepsmote = DeepSMOTE(dim, deepsmote_neighbours) if use_deepsmote else None
        self.classifier = Classifier(dim, scaled(128, width_multiplier), classifier_dropout)
        self.wide = nn.Linear(n_features, 1) if (wide and use_radiomics) else None
        if self.wide is not None:  # training sets it from a fitted linear model (loop.fit_wide_term)
            nn.init.zeros_(self.wide.weight)
            nn.init.zeros_(self.wide.bias)
            nn.init.zeros_(self.classifier.net[-1].weight)  # the deep part starts as "no correction"
            nn.init.zeros_(self.classifier.net[-1].bias)

    def forward(self, patches: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        img = (self.image(patches.contiguous(memory_format=torch.channels_last_3d))
               if self.image is not None else None)
        rad = self.radiomics(features) if self.radiomics is not None else None
        if img is not None and rad is not None:
            z = self.fusion(img, rad)
        else:
            z = img if img is not None else rad
        extra = features if self.wide is not None else None
        if self.deepsmote is not None:
            z, labels, extra = self.deepsmote(z, labels, extra)
        logits = self.classifier(z)
        if self.wide is not None:
            logits = logits + self.wide(extra).squeeze(1)
        return logits, labels


def vgg_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3x3 conv-BN-ReLU then 2x2x2 max-pool (VGG style)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(2))


class RimNetLike(nn.Module):
    """Compact RimNet-style comparator (Barquero et al., NeuroImage: Clinical 2020).

    RimNet runs one VGG-like 3D CNN branch per MR contrast and fuses them. Here: one branch per patch
    channel (QSM, FLAIR), each three VGG blocks (32/64/128 x w channels; 32x32x16 -> 4x4x2), with an
    early-fusion branch on the stacked channels after the first block and late fusion by concatenating
    the globally pooled branch vectors, then FC 256 x w (ReLU, dropout) -> 1 logit. Image only: radiomic
    features are ignored.
    """

    def __init__(self, in_channels: int = 2, width_multiplier: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        w = [scaled(c, width_multiplier) for c in (32, 64, 128)]
        self.first = nn.ModuleList([vgg_block(1, w[0]) for _ in range(in_channels)])
        self.rest = nn.ModuleList([nn.Sequential(vgg_block(w[0], w[1]), vgg_block(w[1], w[2]))
                                   for _ in range(in_channels)])
        self.early = nn.Sequential(vgg_block(in_channels * w[0], w[1]), vgg_block(w[1], w[2]))
        self.pool = nn.AdaptiveAvgPool3d(1)
        hidden = scaled(256, width_multiplier)
        self.head = nn.Sequential(nn.Linear((in_channels + 1) * w[2], hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, patches: torch.Tensor, features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        patches = patches.contiguous(memory_format=torch.channels_last_3d)
        firsts = [blk(patches[:, c:c + 1]) for c, blk in enumerate(self.first)]
        vectors = [self.pool(rest(f)).flatten(1) for rest, f in zip(self.rest, firsts)]
        vectors.append(self.pool(self.early(torch.cat(firsts, dim=1))).flatten(1))
        return self.head(torch.cat(vectors, dim=1)).squeeze(1), labels


def build_network(config: TrainConfig, n_features: int, in_channels: int | None = None) -> nn.Module:
    """The network for ``config.method`` (the registry's builder: the paper's ablations and NN comparators).

    Weights are kept channels-last (NDHWC): on CPU the 3D convolutions then run ~1.6x faster
    (measured: 0.83 s vs 1.32 s per 64-patch training step at width 0.125, 2 threads), and the inputs
    are converted in ``forward`` so callers need not care.
    """
    from .methods import NETWORK_METHODS, get

    if in_channels is None:
        in_channels = len(config.input_spec().channels)
    method = get(config.method)
    if method.kind != "network":
        raise ValueError(f"method {method.name!r} is not a neural network (one of {', '.join(NETWORK_METHODS)})")
    return method.build()(config, n_features, in_channels).to(memory_format=torch.channels_last_3d)


def _fused(config: TrainConfig, n_features: int, in_channels: int, use_image: bool, use_radiomics: bool,
           use_deepsmote: bool) -> QSMRimNet:
    return QSMRimNet(use_image=use_image, use_radiomics=use_radiomics, use_deepsmote=use_deepsmote,
                     n_features=n_features, in_channels=in_channels, width_multiplier=config.width_multiplier,
                     fusion=config.fusion, deepsmote_neighbours=config.deepsmote_neighbours,
                     radiomics_dropout=config.radiomics_dropout, classifier_dropout=config.classifier_dropout,
                     stem_stride=config.stem_stride, wide=config.wide)


def build_qsmrimnet(config: TrainConfig, n_features: int, in_channels: int) -> nn.Module:
    return _fused(config, n_features, in_channels, True, True, config.deepsmote)


def build_image_radiomics(config: TrainConfig, n_features: int, in_channels: int) -> nn.Module:
    return _fused(config, n_features, in_channels, True, True, False)


def build_image_only(config: TrainConfig, n_features: int, in_channels: int) -> nn.Module:
    return _fused(config, n_features, in_channels, True, False, False)


def build_aprl_nn(config: TrainConfig, n_features: int, in_channels: int) -> nn.Module:
    return _fused(config, n_features, in_channels, False, True, False)


def build_rimnet(config: TrainConfig, n_features: int, in_channels: int) -> nn.Module:
    return RimNetLike(in_channels=in_channels, width_multiplier=config.width_multiplier,
                      dropout=config.classifier_dropout)
