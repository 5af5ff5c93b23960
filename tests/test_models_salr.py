"""The SALR paper's CIFAR networks: All-CNN-BN, MobileNetV2 and RegNetX (CIFAR variants).

Parameter counts against by-hand formulas and published figures, structure against the reference code, and
(where torchvision is installed) outputs equal to torchvision's MobileNetV2 and RegNet with the same weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness.models import create_model, get_model_info, list_models
from sharpness.models.regnet import REGNETX, regnet_stages


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def modules(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def bn(channels: int) -> int:
    return 2 * channels


CIFAR = (3, 32, 32)


# name, num_classes, input_shape, options: small settings so every forward pass is cheap
FORWARD = [
    ("allcnn", 10, CIFAR, {"width": 4}),
    ("allcnn", 7, (1, 28, 28), {"width": 4, "layout": "all_cnn_c", "batch_norm": False, "dropout": (0.1, 0.3)}),
    ("allcnn", 5, (3, 9, 12), {"width": 2, "layout": "all_cnn_c", "dropout": False}),
    ("mobilenetv2", 10, CIFAR, {"width_mult": 0.25}),
    ("mobilenetv2", 3, (1, 20, 24), {"width_mult": 0.1, "dropout": 0.2}),
    ("regnetx", 10, CIFAR, {"widths": (8, 16, 24, 32), "depths": (1, 1, 2, 1), "stem_width": 8}),
    ("regnetx", 4, (2, 16, 16), {"widths": (4, 16), "depths": (2, 1), "group_width": 8, "stem_width": 4}),
]


@pytest.mark.parametrize("name, num_classes, input_shape, options", FORWARD,
                         ids=[f"{row[0]}-{i}" for i, row in enumerate(FORWARD)])
def test_output_shapes_and_gradients(name, num_classes, input_shape, options):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, input_shape=input_shape, **options)
    x = torch.randn(2, *input_shape)
    out = model(x)
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter takes part
    model.eval()
    assert model(x).shape == out.shape


@pytest.mark.parametrize("name", ["allcnn", "mobilenetv2", "regnetx"])
def test_full_size_models_build_and_run_on_the_meta_device(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=100, input_shape=CIFAR)
        out = model(torch.empty(2, *CIFAR))
    assert out.shape == (2, 100) and out.is_meta
    assert name in [info.name for info in list_models()] and get_model_info(name).description


def test_registry_options():
    assert dict(get_model_info("allcnn").options) == {"width": 96, "layout": "entropy_sgd", "batch_norm": True,
                                                      "dropout": True}
    assert dict(get_model_info("mobilenetv2").options) == {"width_mult": 1.0, "dropout": 0.0}
    assert dict(get_model_info("regnetx").options) == {"flops": "200mf", "depths": None, "widths": None,
                                                       "group_width": None, "stem_width": 64}


# ----------------------------------------------------------------------------------------- All-CNN-BN --


def _allcnn_size(classes: int, layout: str = "entropy_sgd", batch_norm: bool = True) -> int:
    """By hand: convolutions with biases, each followed by BN (2 parameters per channel) when enabled."""
    def conv(c_in: int, c_out: int, k: int = 3) -> int:
        return k * k * c_in * c_out + c_out + (bn(c_out) if batch_norm else 0)

    tail = conv(192, 192) * 2 if layout == "entropy_sgd" else conv(192, 192) + conv(192, 192, 1)
    return (conv(3, 96) + 2 * conv(96, 96) + conv(96, 192) + 2 * conv(192, 192) + tail
            + conv(192, classes, 1))


@pytest.mark.parametrize("layout, batch_norm, classes, exact", [
    ("entropy_sgd", True, 10, 1_667_166), ("entropy_sgd", True, 100, 1_684_716),
    ("all_cnn_c", False, 10, 1_369_738), ("all_cnn_c", True, 10, 1_372_254), ("all_cnn_c", False, 100, 1_387_108)])
def test_allcnn_parameter_counts(layout, batch_norm, classes, exact):
    """Chaudhari et al.'s All-CNN-BN: 1.67M (their code prints 1,667,166 for CIFAR-10); Springenberg et al.'s
    All-CNN-C without BN: 1.3M in their Table 2 (1,369,738 exactly)."""
    with torch.device("meta"):
        model = create_model("allcnn", num_classes=classes, input_shape=CIFAR, layout=layout,
                             batch_norm=batch_norm)
    assert count(model) == _allcnn_size(classes, layout, batch_norm) == exact


def test_allcnn_is_the_entropy_sgd_network_layer_for_layer():
    """ucla-vision/entropy-sgd, python/models.py, ``allcnn``: Dropout(0.2), convbn(3,96,3,1,1),
    convbn(96,96,3,1,1), convbn(96,96,3,2,1), Dropout(0.5), convbn(96,192,3,1,1), convbn(192,192,3,1,1),
    convbn(192,192,3,2,1), Dropout(0.5), convbn(192,192,3,1,1), convbn(192,192,3,1,1), convbn(192,10,1,1),
    AvgPool2d(8); convbn = Conv2d (with bias), BatchNorm2d, ReLU."""
    reference = [(3, 96, 3, 1, 1), (96, 96, 3, 1, 1), (96, 96, 3, 2, 1), (96, 192, 3, 1, 1), (192, 192, 3, 1, 1),
                 (192, 192, 3, 2, 1), (192, 192, 3, 1, 1), (192, 192, 3, 1, 1), (192, 10, 1, 1, 0)]
    model = create_model("allcnn", num_classes=10, input_shape=CIFAR)
    layers = [type(m).__name__ for m in model.features.modules() if not isinstance(m, nn.Sequential)]
    convbn = ["Conv2d", "BatchNorm2d", "ReLU"]
    assert layers == ["Dropout", *convbn * 3, "Dropout", *convbn * 3, "Dropout", *convbn * 3]
    convs = modules(model, nn.Conv2d)
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == reference
    assert all(c.bias is not None for c in convs)
    assert [m.p for m in modules(model, nn.Dropout)] == [0.2, 0.5, 0.5]
    # PyTorch's default initialisation, as in the reference: uniform within 1/sqrt(fan_in), BN at 1 and 0
    assert float(convs[4].weight.abs().max()) <= (96 * 9) ** -0.5
    assert all(torch.equal(m.weight, torch.ones(m.num_features)) for m in modules(model, nn.BatchNorm2d))
    x = torch.randn(2, *CIFAR)
    assert model.features[:4](x).shape == (2, 96, 16, 16) and model.features(x).shape == (2, 10, 8, 8)
    model.eval()
    assert (model(x) >= 0).all()  # the class layer ends in BN and ReLU, as in both references


def test_allcnn_c_layout_and_dropout_options():
    model = create_model("allcnn", num_classes=10, input_shape=CIFAR, layout="all_cnn_c", batch_norm=False,
                         dropout=(0.1, 0.3))
    convs = modules(model, nn.Conv2d)
    assert [(c.kernel_size[0], c.padding[0], c.out_channels) for c in convs[-3:]] == [(3, 0, 192), (1, 0, 192),
                                                                                      (1, 0, 10)]
    assert not modules(model, nn.BatchNorm2d) and [m.p for m in modules(model, nn.Dropout)] == [0.1, 0.3, 0.3]
    assert model.features[:-1](torch.randn(1, *CIFAR)).shape == (1, 192, 6, 6)  # Springenberg's 6x6 maps
    plain = create_model("allcnn", num_classes=10, input_shape=CIFAR, width=8, dropout=False)
    assert not modules(plain, nn.Dropout) and modules(plain, nn.Conv2d)[3].out_channels == 16


# ---------------------------------------------------------------------------------------- MobileNetV2 --


def _mobilenet_size(classes: int, stem: int = 32, widths: tuple[int, ...] = (16, 24, 32, 64, 96, 160, 320),
                    head: int = 1280, kuangliu: bool = False) -> int:
    """By hand from the paper's Table 2: bias-free convolutions, each with BN; a block expands (1x1 to t * c_in,
    unless t = 1), filters (3x3 depthwise), projects (1x1). ``kuangliu=True``: his CIFAR version, which also
    expands when t = 1 and adds a 1x1 conv + BN shortcut to stride-1 blocks that change the channels."""
    expansions, repeats = (1, 6, 6, 6, 6, 6, 6), (1, 2, 3, 4, 3, 3, 1)
    strides = (1, 1, 2, 2, 1, 2, 1)  # CIFAR (the stem's and the second stage's are 2 in the paper)
    size, channels = 9 * 3 * stem + bn(stem), stem
    for t, c, n, s in zip(expansions, widths, repeats, strides, strict=True):
        for i in range(n):
            hidden = t * channels
            if t != 1 or kuangliu:
                size += channels * hidden + bn(hidden)
            size += 9 * hidden + bn(hidden) + hidden * c + bn(c)
            if kuangliu and (s if i == 0 else 1) == 1 and channels != c:
                size += channels * c + bn(c)
            channels = c
    return size + channels * head + bn(head) + head * classes + classes


@pytest.mark.parametrize("classes, exact", [(10, 2_236_682), (100, 2_351_972), (1000, 3_504_872)])
def test_mobilenetv2_parameter_counts(classes, exact):
    """3,504,872 for 1000 classes is torchvision's published ``mobilenet_v2`` count (the paper: 3.4M);
    kuangliu/pytorch-cifar's CIFAR version reports 2,296,922 for 10 classes."""
    with torch.device("meta"):
        model = create_model("mobilenetv2", num_classes=classes, input_shape=CIFAR)
    assert count(model) == _mobilenet_size(classes) == exact
    assert _mobilenet_size(10, kuangliu=True) == 2_296_922
    assert len(modules(model, nn.Conv2d)) == 1 + (2 + 16 * 3) + 1 and not modules(model, nn.Dropout)
    half = create_model("mobilenetv2", num_classes=classes, input_shape=CIFAR, width_mult=0.5, dropout=0.2)
    # channels x 0.5 rounded to multiples of 8 (12 -> 16), the last convolution kept at 1280
    assert count(half) == _mobilenet_size(classes, 16, (8, 16, 16, 32, 48, 80, 160))
    assert [m.p for m in modules(half, nn.Dropout)] == [0.2]


def test_mobilenetv2_strides_and_blocks():
    model = create_model("mobilenetv2", num_classes=10, input_shape=CIFAR)
    x, sizes = torch.randn(2, *CIFAR), []
    with torch.no_grad():
        x = model.stem(x)
        for stage in model.stages:
            x = stage(x)
            sizes.append(x.shape[-1])
    assert sizes == [32, 32, 16, 8, 8, 4, 4]  # CIFAR: the stem and the second stage keep 32x32
    blocks = [block for stage in model.stages for block in stage]
    assert [block.identity for block in blocks] == [False, False, True, False, True, True, False, True, True, True,
                                                    False, True, True, False, True, True, False]
    assert len(blocks[0].residual) == 2 and len(blocks[1].residual) == 3  # t = 1: no expansion convolution
    assert len(modules(model, nn.ReLU6)) == 1 + 2 * 17 - 1 + 1
    assert float(model.fc.weight.std()) == pytest.approx(0.01, rel=0.05) and not model.fc.bias.any()
    conv = blocks[5].residual[0][0]  # 1x1, 32 -> 192: He-normal (fan-out)
    assert float(conv.weight.std()) == pytest.approx((2 / 192) ** 0.5, rel=0.05)


# ------------------------------------------------------------------------------------------- RegNetX --


def _regnet_size(classes: int, depths, widths, group_width: int, stem: int = 64) -> int:
    """By hand: the stem (3x3 conv + BN); per X block a 1x1, a 3x3 grouped (w * group_width * 9 weights), a
    1x1, each with BN, and a 1x1 + BN projection where the shape changes (channels, or stride 2 at the first
    block of the third and later stages); the Linear head."""
    size, channels = 27 * stem + bn(stem), stem
    for stage, (depth, w) in enumerate(zip(depths, widths, strict=True)):
        g = min(group_width, w)
        for block in range(depth):
            c_in = channels if block == 0 else w
            size += c_in * w + bn(w) + 9 * w * g + bn(w) + w * w + bn(w)
            if c_in != w or (block == 0 and stage >= 2):
                size += c_in * w + bn(w)
        channels = w
    return size + channels * classes + classes


def test_regnet_widths_follow_the_paper_rule():
    """kuangliu/pytorch-cifar's RegNetX_200MF and RegNetX_400MF (pycls's published widths)."""
    assert regnet_stages(*REGNETX["200mf"]) == ([1, 1, 4, 7], [24, 56, 152, 368], [8] * 4)
    assert regnet_stages(*REGNETX["400mf"]) == ([1, 2, 7, 12], [32, 64, 160, 384], [16] * 4)
    assert regnet_stages(*REGNETX["8.0gf"]) == ([2, 5, 15, 1], [80, 240, 720, 1920], [80, 120, 120, 120])


@pytest.mark.parametrize("flops, classes, exact", [
    ("200mf", 10, 2_321_946), ("200mf", 100, 2_355_156), ("400mf", 10, 4_779_338)])
def test_cifar_regnetx_parameter_counts(flops, classes, exact):
    model = create_model("regnetx", num_classes=classes, input_shape=CIFAR, flops=flops)
    depths, widths, groups = regnet_stages(*REGNETX[flops])
    assert count(model) == _regnet_size(classes, depths, widths, groups[0]) == exact
    assert (model.stem[0].kernel_size, model.stem[0].stride, model.stem[0].out_channels) == ((3, 3), (1, 1), 64)
    blocks = [stage[0] for stage in model.stages]
    assert [block.residual[3].stride[0] for block in blocks] == [1, 1, 2, 2]
    assert [block.residual[3].groups for block in blocks] == [w // groups[0] for w in widths]
    with torch.no_grad():
        assert model.stages(model.stem(torch.randn(1, *CIFAR))).shape == (1, widths[-1], 8, 8)


# The paper's parameter counts of the ImageNet models (stem of 32 channels, 1000 classes), in millions
PUBLISHED = {"200mf": 2.7, "400mf": 5.2, "600mf": 6.2, "800mf": 7.3, "1.6gf": 9.2, "3.2gf": 15.3, "4.0gf": 22.1,
             "6.4gf": 26.2, "8.0gf": 39.6, "12gf": 46.1, "16gf": 54.3, "32gf": 107.8}


@pytest.mark.parametrize("flops", list(REGNETX))
def test_regnetx_sizes_match_the_published_imagenet_models(flops):
    """The same layers with the paper's 32-channel stem and 1000 classes (strides do not change the count)
    have the published sizes (Radosavovic et al., 2020; pycls model zoo)."""
    with torch.device("meta"):
        model = create_model("regnetx", num_classes=1000, input_shape=(3, 224, 224), flops=flops, stem_width=32)
    assert round(count(model) / 1e6, 1) == PUBLISHED[flops]
    assert count(model) == _regnet_size(1000, *regnet_stages(*REGNETX[flops])[:2], REGNETX[flops][4], stem=32)


def test_regnetx_explicit_sizes_and_initialisation():
    model = create_model("regnetx", num_classes=10, input_shape=CIFAR, depths=(1, 2), widths=(4, 16),
                         group_width=8, stem_width=8)
    assert count(model) == _regnet_size(10, (1, 2), (4, 16), 8, stem=8)
    assert [stage[0].residual[3].groups for stage in model.stages] == [1, 2]  # a 4-wide stage: one group
    assert isinstance(model.stages[1][1].shortcut, nn.Identity)
    big = create_model("regnetx", num_classes=10, input_shape=CIFAR)
    conv = big.stages[3][1].residual[0]  # 1x1, 368 -> 368
    assert float(conv.weight.std()) == pytest.approx((2 / 368) ** 0.5, rel=0.05)
    assert float(big.fc.weight.std()) == pytest.approx(0.01, rel=0.1) and not big.fc.bias.any()
    assert all(torch.equal(m.bias, torch.zeros(m.num_features)) for m in modules(big, nn.BatchNorm2d))


# ------------------------------------------------------------------------------ torchvision cross-checks --


def _load_in_order(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy ``theirs``' parameters and buffers into ``ours`` by position (the names differ)."""
    source = list(theirs.state_dict().values())
    target = ours.state_dict()
    assert [tuple(v.shape) for v in target.values()] == [tuple(v.shape) for v in source]
    ours.load_state_dict(dict(zip(target, source, strict=True)))


def _same_function(ours: nn.Module, theirs: nn.Module) -> float:
    """Largest output difference in float64, train mode (batch statistics; the running statistics must then
    agree too) and eval mode."""
    torch.manual_seed(1)
    ours, theirs = ours.double(), theirs.double()
    _load_in_order(ours, theirs)
    x = torch.randn(2, *CIFAR, dtype=torch.float64)
    worst = 0.0
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        worst = max(worst, float((a - b).abs().max()))
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    return worst


def test_mobilenetv2_equals_torchvision_with_cifar_strides():
    models = pytest.importorskip("torchvision.models")
    theirs = models.mobilenet_v2(num_classes=10)
    theirs.features[0][0].stride = (1, 1)  # the stem
    theirs.features[2].conv[1][0].stride = (1, 1)  # the depthwise convolution of the second stage's first block
    theirs.classifier[0].p = 0.0  # torchvision's Dropout(0.2); ours has none by default
    ours = create_model("mobilenetv2", num_classes=10, input_shape=CIFAR)
    assert count(ours) == count(theirs)
    assert _same_function(ours, theirs) <= 1e-10
    half = models.mobilenet_v2(num_classes=10, width_mult=0.5)
    assert count(create_model("mobilenetv2", num_classes=10, input_shape=CIFAR, width_mult=0.5)) == count(half)


def test_regnetx_equals_torchvision_regnet_with_a_cifar_stem():
    regnet = pytest.importorskip("torchvision.models.regnet")
    from torchvision.ops.misc import Conv2dNormActivation

    def stem(width_in, width_out, norm_layer, activation):
        return Conv2dNormActivation(width_in, width_out, kernel_size=3, stride=1, norm_layer=norm_layer,
                                    activation_layer=activation)

    depths, widths, groups = regnet_stages(*REGNETX["200mf"])
    params = regnet.BlockParams(depths=depths, widths=widths, group_widths=groups,
                                bottleneck_multipliers=[1.0] * 4, strides=[1, 1, 2, 2])
    theirs = regnet.RegNet(params, num_classes=10, stem_width=64, stem_type=stem)
    ours = create_model("regnetx", num_classes=10, input_shape=CIFAR)
    assert count(ours) == count(theirs) == 2_321_946
    assert _same_function(ours, theirs) <= 1e-10


def test_regnet_rule_matches_torchvision_but_for_its_rounding_of_two_sizes():
    """torchvision's ``BlockParams.from_init_params`` with the same parameters gives the same stages, but
    for its width rounding (``_make_divisible``: half up, and one group more where rounding loses over 10%):
    400MF's last stage 392 -> 400 (pycls: 384, round half to even) and 4.0GF's first 96 -> 120 (pycls: 80)."""
    regnet = pytest.importorskip("torchvision.models.regnet")
    differ = {"400mf": [32, 64, 160, 400], "4.0gf": [120, 240, 560, 1360]}
    for flops, (depth, w_0, w_a, w_m, group_width) in REGNETX.items():
        theirs = regnet.BlockParams.from_init_params(depth=depth, w_0=w_0, w_a=w_a, w_m=w_m,
                                                     group_width=group_width)
        ours = regnet_stages(depth, w_0, w_a, w_m, group_width)
        if flops in differ:
            assert theirs.widths == differ[flops] and theirs.depths == ours[0] and theirs.widths != ours[1]
        else:
            assert (theirs.depths, theirs.widths, theirs.group_widths) == ours, flops


# ------------------------------------------------------------------------------------------- errors --


@pytest.mark.parametrize("name, options, error, message", [
    ("allcnn", {"layout": "vgg"}, ValueError,
     "Invalid layout value: 'vgg' (expected one of 'entropy_sgd', 'all_cnn_c')"),
    ("allcnn", {"dropout": 0.5}, TypeError,
     "Invalid dropout type: float 0.5 (expected a bool or a pair of rates (input, block), e.g. (0.2, 0.5))"),
    ("allcnn", {"dropout": (0.2, 1.0)}, ValueError, "Invalid dropout value: 1.0 (expected 0 <= dropout < 1)"),
    ("allcnn", {"width": 0}, ValueError, "Invalid width value: 0 (expected an integer width >= 1)"),
    ("allcnn", {"batch_norm": "yes"}, TypeError, "Invalid batch_norm type: str (expected bool)"),
    ("allcnn", {"input_shape": (32, 32)}, ValueError,
     "Invalid input_shape for 'allcnn': (32, 32) (expected (C, H, W))"),
    ("allcnn", {"input_shape": (3, 8, 8), "layout": "all_cnn_c"}, ValueError,
     "Invalid input_shape for 'allcnn' with layout 'all_cnn_c': (3, 8, 8) (expected images of at least 9 x 9"),
    ("mobilenetv2", {"width_mult": 0}, ValueError,
     "Invalid width_mult value: 0.0 (expected width_mult > 0 and finite)"),
    ("mobilenetv2", {"width_mult": "1"}, TypeError, "Invalid width_mult type: str '1' (expected a real number)"),
    ("mobilenetv2", {"dropout": 1}, ValueError, "Invalid dropout value: 1.0 (expected 0 <= dropout < 1)"),
    ("mobilenetv2", {"input_shape": (784,)}, ValueError, "Invalid input_shape for 'mobilenetv2': (784,)"),
    ("regnetx", {"flops": "300mf"}, ValueError,
     "Invalid flops value: '300mf' (expected one of '200mf', '400mf', '600mf', '800mf', '1.6gf'"),
    ("regnetx", {"depths": (1, 1)}, ValueError,
     "Invalid depths and widths values: [1, 1] and [24, 56, 152, 368] (expected one depth and one width"),
    ("regnetx", {"widths": (24, 60, 152, 368)}, ValueError,
     "Invalid widths value: [24, 60, 152, 368] (expected multiples of group_width = 8; [60] are not)"),
    ("regnetx", {"depths": "1147"}, TypeError, "Invalid depths type: str '1147' (expected a sequence of integers"),
    ("regnetx", {"depths": (1, 0, 4, 7)}, ValueError,
     "Invalid depths value: [1, 0, 4, 7] (expected one or more integers >= 1)"),
    ("regnetx", {"widths": ()}, ValueError, "Invalid widths value: [] (expected one or more integers >= 1)"),
    ("regnetx", {"group_width": 0}, ValueError, "Invalid group_width value: 0 (expected an integer group_width >= 1)"),
    ("regnetx", {"stem_width": 2.0}, TypeError, "Invalid stem_width type: float 2.0 (expected an integer >= 1)"),
    ("regnetx", {"input_shape": (3, 32)}, ValueError, "Invalid input_shape for 'regnetx': (3, 32)"),
])
def test_bad_options(name, options, error, message):
    kwargs = {"num_classes": 10, "input_shape": CIFAR, **options}
    with pytest.raises(error) as info:
        create_model(name, **kwargs)
    assert message in str(info.value)
