"""Split classifiers whose head is a CompressAI bottleneck (the sc2bench "Entropic Student" family).

Module and parameter names follow sc2bench (``bottleneck_layer.g_a.0.weight``, ``layer2...``, ``fc``
for ResNet; ``s2...``, ``head.fc`` for RegNet) so that the paper's released checkpoints load.

Every split model takes images in [0, 1] (NCHW, float32); ImageNet normalisation is the first
step of the head and lives in a buffer that is not part of the state dict.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN1
from compressai.models import CompressionModel
from compressai.models.utils import update_registered_buffers
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHS = ("tiny", "resnet50", "resnet101", "regnety_064")
FAMILIES = ("fp", "mshp")


def default_scale_table(min_scale: float = 0.11, max_scale: float = 256.0, levels: int = 64) -> Tensor:
    """CompressAI's default table of Gaussian scales (log-spaced)."""
    return torch.exp(torch.linspace(math.log(min_scale), math.log(max_scale), levels))


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with non-persistent buffers (keeps state dicts sc2bench-clean)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# Bottlenecks
# --------------------------------------------------------------------------------------------


def _analysis(sizes: list[int], bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(sizes[0], sizes[1], kernel_size=5, stride=2, padding=2, bias=bias),
        GDN1(sizes[1]),
        nn.Conv2d(sizes[1], sizes[2], kernel_size=5, stride=2, padding=2, bias=bias),
        GDN1(sizes[2]),
        nn.Conv2d(sizes[2], sizes[3], kernel_size=2, stride=1, padding=0, bias=bias),
    )


def _synthesis(sizes: list[int], bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(sizes[0], sizes[1], kernel_size=2, stride=1, padding=1, bias=bias),
        GDN1(sizes[1], inverse=True),
        nn.Conv2d(sizes[1], sizes[2], kernel_size=2, stride=1, padding=0, bias=bias),
        GDN1(sizes[2], inverse=True),
        nn.Conv2d(sizes[2], sizes[3], kernel_size=2, stride=1, padding=1, bias=bias),
    )


class SplitBottleneck(CompressionModel):
    """Common interface of the FP and MSHP bottlenecks.

    ``encode_latents`` / ``decode_latents`` are the pieces exported to ONNX; ``likelihoods`` gives
    the differentiable rate terms used by training and attacks.
    """

    family: str = ""

    def latent_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def encode_latents(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def synthesis(self) -> nn.Module:
        raise NotImplementedError

    def forward_train(self, x: Tensor, noise: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (decoder output, {name: likelihoods}); ``noise`` picks uniform noise vs rounding."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, **kwargs: Any):
        state_dict = OrderedDict(state_dict)
        for name, module in self.named_modules():
            if isinstance(module, GaussianConditional):
                # Older checkpoints lack the scale_bound buffer; it is fixed at 0.11 anyway.
                key = f"{name}.scale_bound"
                if key not in state_dict and module.scale_bound is not None:
                    state_dict[key] = module.scale_bound.clone()
                update_registered_buffers(
                    module, name, ["_quantized_cdf", "_offset", "_cdf_length", "scale_table"], state_dict
                )
        return super().load_state_dict(state_dict, strict=strict)


def _channel_sizes(num_input: int, num_bottleneck: int, num_target: int, analysis: list[int] | None,
                   synthesis: list[int] | None) -> tuple[list[int], list[int]]:
    """sc2bench's default analysis and synthesis channel sizes, where none are given."""
    if analysis is None:
        analysis = [num_input, num_bottleneck * 4, num_bottleneck * 2, num_bottleneck]
    if synthesis is None:
        synthesis = [analysis[-1], num_target * 2, num_target, num_target]
    return analysis, synthesis


class FPBottleneck(SplitBottleneck):
    """Factorized-prior bottleneck (sc2bench ``FPBasedResNetBottleneck``; ``conv_bias`` adds conv biases)."""

    family = "fp"

    def __init__(
        self,
        num_input_channels: int = 3,
        num_bottleneck_channels: int = 24,
        num_target_channels: int = 256,
        encoder_channel_sizes: list[int] | None = None,
        decoder_channel_sizes: list[int] | None = None,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        encoder_channel_sizes, decoder_channel_sizes = _channel_sizes(
            num_input_channels, num_bottleneck_channels, num_target_channels, encoder_channel_sizes,
            decoder_channel_sizes)
        self.entropy_bottleneck = EntropyBottleneck(encoder_channel_sizes[-1])
        self.encoder = _analysis(encoder_channel_sizes, conv_bias)
        self.decoder = _synthesis(decoder_channel_sizes, conv_bias)

    def latent_names(self) -> tuple[str, ...]:
        return ("y",)

    def encode_latents(self, x: Tensor) -> tuple[Tensor, ...]:
        return (self.encoder(x),)

    def synthesis(self) -> nn.Module:
        return self.decoder

    def forward_train(self, x: Tensor, noise: bool) -> tuple[Tensor, dict[str, Tensor]]:
        y = self.encoder(x)
        y_hat, y_lik = self.entropy_bottleneck(y, training=noise)
        return self.decoder(y_hat), {"y": y_lik}


class MSHPBottleneck(SplitBottleneck):
    """Mean-scale hyperprior bottleneck (sc2bench ``MSHPBasedResNetBottleneck``; ``conv_bias`` adds
    biases to the g_a/g_s convolutions, off for sc2bench compatibility)."""

    family = "mshp"

    def __init__(
        self,
        num_input_channels: int = 3,
        num_latent_channels: int = 16,
        num_bottleneck_channels: int = 24,
        num_target_channels: int = 256,
        g_a_channel_sizes: list[int] | None = None,
        g_s_channel_sizes: list[int] | None = None,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        if g_a_channel_sizes is not None:
            num_bottleneck_channels = g_a_channel_sizes[3]
        g_a_channel_sizes, g_s_channel_sizes = _channel_sizes(
            num_input_channels, num_bottleneck_channels, num_target_channels, g_a_channel_sizes, g_s_channel_sizes)
        nl, nb = num_latent_channels, num_bottleneck_channels
        self.entropy_bottleneck = EntropyBottleneck(nl)
        self.g_a = _analysis(g_a_channel_sizes, conv_bias)
        self.g_s = _synthesis(g_s_channel_sizes, conv_bias)
        self.h_a = nn.Sequential(
            nn.Conv2d(nb, nl, kernel_size=5, stride=2, padding=1, bias=False),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(nl, nl, kernel_size=5, stride=2, padding=2, bias=False),
        )
        self.h_s = nn.Sequential(
            nn.ConvTranspose2d(nl, nl, kernel_size=5, stride=2, padding=1, bias=False),
            nn.LeakyReLU(inplace=True),
            nn.ConvTranspose2d(nl, nl * 3 // 2, kernel_size=5, stride=2, padding=1, bias=False),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(nl * 3 // 2, nb * 2, kernel_size=5, stride=1, padding=0, bias=False),
        )
        self.gaussian_conditional = GaussianConditional(None)
        self.num_latent_channels = nl
        self.num_bottleneck_channels = nb

    def latent_names(self) -> tuple[str, ...]:
        return ("y", "z")

    def encode_latents(self, x: Tensor) -> tuple[Tensor, ...]:
        y = self.g_a(x)
        return y, self.h_a(y)

    def hyper(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """h_s(ẑ) → (scales, means), each with the shape of y."""
        scales, means = self.h_s(z_hat).chunk(2, 1)
        return scales, means

    def synthesis(self) -> nn.Module:
        return self.g_s

    def forward_train(self, x: Tensor, noise: bool) -> tuple[Tensor, dict[str, Tensor]]:
        y = self.g_a(x)
        z = self.h_a(y)
        z_hat, z_lik = self.entropy_bottleneck(z, training=noise)
        scales, means = self.hyper(z_hat)
        y_hat, y_lik = self.gaussian_conditional(y, scales, means=means, training=noise)
        return self.g_s(y_hat), {"y": y_lik, "z": z_lik}

    def update(self, scale_table: Tensor | None = None, force: bool = False, **kwargs: Any) -> bool:
        if scale_table is None:
            scale_table = default_scale_table()
        return super().update(scale_table=scale_table, force=force, **kwargs)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """A small ResNet for 64×64 images, shaped like torchvision's (conv1…layer1 is the split point)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128),
                 stem_width: int = 24) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = BasicBlock(stem_width, widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.layer3 = BasicBlock(widths[1], widths[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def stem_to_split(self, x: Tensor) -> Tensor:
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.stem_to_split(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model; stored in checkpoints and bundle manifests."""

    arch: str = "tiny"
    family: str | None = None  # None: the plain (teacher) classifier
    num_classes: int = 10
    input_size: int = 64
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    bottleneck: dict[str, Any] = field(default_factory=dict)
    tiny_widths: tuple[int, int, int] = (32, 64, 128)
    class_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["tiny_widths"] = list(self.mean), list(self.std), list(self.tiny_widths)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("mean", "std", "tiny_widths"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"unknown entropy model family {self.family!r}; choose from fp, mshp")
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2")


def default_bottleneck(arch: str, family: str) -> dict[str, Any]:
    """sc2bench defaults for the big backbones, small channels for ``tiny``."""
    if arch in ("resnet50", "resnet101"):
        kw: dict[str, Any] = {"num_bottleneck_channels": 24, "num_target_channels": 256}
    elif arch == "regnety_064":
        kw = {"g_a_channel_sizes": [3, 64, 64, 64], "g_s_channel_sizes": [64, 288, 144, 144]}
        if family == "fp":
            kw = {"encoder_channel_sizes": [3, 64, 64, 64], "decoder_channel_sizes": [64, 288, 144, 144]}
    else:
        # num_target_channels follows tiny_widths[0]. conv_bias: without biases g_a/g_s (GDN1 and
        # bias-free convs) are odd functions of the normalised image, which cannot reproduce the
        # rectified (ReLU) split features; sc2bench's big models learn around it over ~200k
        # steps, a CPU-sized run cannot (feature MSE 0.70 vs 0.35 of the target energy after 200 steps).
        kw = {"num_bottleneck_channels": 12, "conv_bias": True}
    if family == "mshp":
        kw["num_latent_channels"] = 16 if arch != "tiny" else 8
    return kw


def build_bottleneck(spec: ModelSpec) -> SplitBottleneck:
    kw = {**default_bottleneck(spec.arch, spec.family or "fp"), **spec.bottleneck}
    if spec.arch == "tiny":
        kw.setdefault("num_target_channels", spec.tiny_widths[0])
    if spec.family == "fp":
        return FPBottleneck(**kw)
    if spec.family == "mshp":
        return MSHPBottleneck(**kw)
    raise ValueError(f"no bottleneck for family {spec.family!r}")


def build_teacher(spec: ModelSpec) -> nn.Module:
    """The plain classifier (no bottleneck) of ``spec.arch``; randomly initialised, never downloaded."""
    if spec.arch == "tiny":
        return TinyResNet(spec.num_classes, spec.tiny_widths)
    if spec.arch in ("resnet50", "resnet101"):
        import torchvision

        return getattr(torchvision.models, spec.arch)(weights=None, num_classes=spec.num_classes)
    import timm

    return timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes)


class SplitClassifier(nn.Module):
    """Head (normalise → bottleneck encoder) | entropy model | tail (bottleneck decoder → backbone rest)."""

    def __init__(self, spec: ModelSpec, bottleneck: SplitBottleneck, backbone: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.bottleneck_layer = bottleneck
        self.rest_names: list[str] = []
        if spec.arch == "regnety_064":
            for name in ("s2", "s3", "s4", "final_conv", "head"):
                setattr(self, name, getattr(backbone, name))
                self.rest_names.append(name)
        else:
            names = ["layer2", "layer3"] + (["layer4"] if spec.arch != "tiny" else []) + ["avgpool", "fc"]
            for name in names:
                setattr(self, name, getattr(backbone, name))
                self.rest_names.append(name)

    @property
    def family(self) -> str:
        return self.bottleneck_layer.family

    def backbone_rest(self, h: Tensor) -> Tensor:
        for name in self.rest_names:
            if name == "fc":
                h = torch.flatten(h, 1)
            h = getattr(self, name)(h)
        return h

    # -- pieces exported to ONNX ----------------------------------------------------------
    def run_head(self, x: Tensor) -> tuple[Tensor, ...]:
        """x in [0,1] → latents (y,) for FP or (y, z) for MSHP."""
        return self.bottleneck_layer.encode_latents(self.normalize(x))

    def run_hyper(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(self.bottleneck_layer, MSHPBottleneck):
            raise TypeError("hyper() exists only for the MSHP family")
        return self.bottleneck_layer.hyper(z_hat)

    def run_tail(self, y_hat: Tensor) -> Tensor:
        return self.backbone_rest(self.bottleneck_layer.synthesis()(y_hat))

    # -- training / analysis ----------------------------------------------------------------
    def forward_train(self, x: Tensor, noise: bool | None = None) -> dict[str, Any]:
        """Logits, split-point features and likelihoods; ``noise`` defaults to ``self.training``."""
        noise = self.training if noise is None else noise
        feat, liks = self.bottleneck_layer.forward_train(self.normalize(x), noise)
        return {"logits": self.backbone_rest(feat), "features": feat, "likelihoods": liks}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_train(x)["logits"]

    def rate_bits(self, x: Tensor, terms: tuple[str, ...] = ("y", "z"), noise: bool = False) -> Tensor:
        """Differentiable −Σlog₂p per image (shape [N]) of the selected latent terms."""
        _, liks = self.bottleneck_layer.forward_train(self.normalize(x), noise)
        bits = [(-torch.log2(liks[t])).flatten(1).sum(1) for t in terms if t in liks]
        if not bits:
            raise ValueError(f"none of the rate terms {terms} exist for family {self.family}")
        return torch.stack(bits).sum(0)

    @torch.no_grad()
    def compress_reference(self, x: Tensor) -> dict[str, Any]:
        """CompressAI's own compress() on the head's latents (the reference bitstreams)."""
        bl = self.bottleneck_layer
        lat = bl.encode_latents(self.normalize(x))
        if isinstance(bl, MSHPBottleneck):
            y, z = lat
            z_strings = bl.entropy_bottleneck.compress(z)
            z_hat = bl.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
            scales, means = bl.hyper(z_hat)
            idx = bl.gaussian_conditional.build_indexes(scales)
            y_strings = bl.gaussian_conditional.compress(y, idx, means=means)
            return {"strings": [y_strings, z_strings], "shape": tuple(z.shape[-2:])}
        (y,) = lat
        return {"strings": [bl.entropy_bottleneck.compress(y)], "shape": tuple(y.shape[-2:])}

    @torch.no_grad()
    def decompress_reference(self, strings: list[list[bytes]], shape: tuple[int, int]) -> Tensor:
        bl = self.bottleneck_layer
        if isinstance(bl, MSHPBottleneck):
            z_hat = bl.entropy_bottleneck.decompress(strings[1], shape)
            scales, means = bl.hyper(z_hat)
            idx = bl.gaussian_conditional.build_indexes(scales)
            y_hat = bl.gaussian_conditional.decompress(strings[0], idx, means=means)
        else:
            y_hat = bl.entropy_bottleneck.decompress(strings[0], shape)
        return self.run_tail(y_hat)

    def update_entropy_tables(self, force: bool = True) -> None:
        """Build the quantised CDF tables (compressai ``update()``), e.g. before export."""
        self.bottleneck_layer.update(force=force)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, **kwargs: Any):
        """Load a full state dict; the bottleneck part goes through compressai's buffer resizing."""
        state_dict = OrderedDict(state_dict)
        bl_sd = OrderedDict()
        for key in list(state_dict):
            if key.startswith("bottleneck_layer."):
                bl_sd[key[len("bottleneck_layer."):]] = state_dict.pop(key)
        self.bottleneck_layer.load_state_dict(bl_sd, strict=strict)
        result = super().load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("bottleneck_layer.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"state dict mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        return result


def build_student(spec: ModelSpec, teacher: nn.Module | None = None) -> SplitClassifier:
    """A split classifier; with ``teacher`` its backbone rest starts from the teacher's weights."""
    if spec.family is None:
        raise ValueError("a student needs an entropy model family (fp or mshp)")
    backbone = build_teacher(spec)
    if teacher is not None:
        backbone.load_state_dict(teacher.state_dict())
    return SplitClassifier(spec, build_bottleneck(spec), backbone)


class TeacherClassifier(nn.Module):
    """A plain classifier on [0, 1] images (normalisation inside), with split-point features."""

    def __init__(self, spec: ModelSpec, net: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.net = net if net is not None else build_teacher(spec)

    def split_features(self, x: Tensor) -> Tensor:
        """The output of the part the student's bottleneck replaces (layer1 / s1)."""
        net, h = self.net, self.normalize(x)
        if isinstance(net, TinyResNet):
            return net.stem_to_split(h)
        if self.spec.arch == "regnety_064":
            return net.s1(net.stem(h))
        return net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(h)))))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def build_model(spec: ModelSpec) -> nn.Module:
    """Teacher (``family is None``) or split student for ``spec``."""
    spec.validate()
    return TeacherClassifier(spec) if spec.family is None else build_student(spec)


def load_sc2bench_state(model: SplitClassifier, sd: Mapping[str, Tensor]) -> list[str]:
    """Load an sc2bench state dict (the ``model`` entry of a torchdistill checkpoint, or a bare one).

    Returns the list of ignored keys (e.g. ``fc`` of a headless checkpoint); raises on missing keys.
    Reading the file is :func:`splitbits.trainer.checkpoint.load_model`'s job (safely, no code runs).
    """
    own = set(model.state_dict())
    ignored = [k for k in sd if k not in own and not k.startswith("bottleneck_layer.")]
    sd = OrderedDict((k, v) for k, v in sd.items() if k not in ignored)
    missing = [k for k in own if k not in sd and not k.startswith("bottleneck_layer.")]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}")
    model.load_state_dict(sd, strict=True)
    return ignored
