"""Model registry: output shapes, published parameter counts, options and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness.models import CharLSTM, create_model, get_model_info, list_models


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def modules(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


# name, num_classes, input_shape, options, batch: small settings so every forward pass is cheap
FORWARD = [
    ("mlp", 10, (1, 28, 28), {}, torch.randn(3, 1, 28, 28)),
    ("mlp6", 10, (1, 28, 28), {}, torch.randn(3, 1, 28, 28)),
    ("mlp", 4, (40,), {"depth": 2, "width": 16, "batch_norm": True, "dropout": 0.1}, torch.randn(3, 40)),
    ("lenet5", 10, (1, 28, 28), {}, torch.randn(3, 1, 28, 28)),
    ("lenet5", 100, (3, 32, 32), {"batch_norm": True, "activation": "tanh", "pooling": "avg"},
     torch.randn(3, 3, 32, 32)),
    ("lenet5", 10, (1, 8, 8), {}, torch.randn(3, 1, 8, 8)),
    ("cnn1d", 10, (40,), {}, torch.randn(3, 40)),
    ("cnn1d", 5, (2, 37), {"channels": 8, "batch_norm": True}, torch.randn(3, 2, 37)),
    ("resnet18", 10, (3, 32, 32), {"width": 4}, torch.randn(2, 3, 32, 32)),
    ("resnet18", 7, (1, 16, 16), {"width": 4, "batch_norm": False}, torch.randn(2, 1, 16, 16)),
    ("resnet", 10, (3, 32, 32), {"width": 4}, torch.randn(2, 3, 32, 32)),
    ("resnet", 7, (1, 16, 16), {"depth": 34, "width": 2, "batch_norm": False}, torch.randn(2, 1, 16, 16)),
    ("resnext", 10, (3, 32, 32), {"depth": 11, "cardinality": 2, "base_width": 4}, torch.randn(2, 3, 32, 32)),
    ("resnext", 5, (1, 28, 28), {"depth": 11, "cardinality": 1, "base_width": 1, "batch_norm": False},
     torch.randn(2, 1, 28, 28)),
    ("wideresnet", 10, (3, 32, 32), {"depth": 10, "widen_factor": 1, "dropout": 0.3},
     torch.randn(2, 3, 32, 32)),
    ("char_lstm", 65, (16,), {"embedding_dim": 8, "hidden_size": 16}, torch.randint(0, 65, (3, 16))),
    ("cifar_resnet", 10, (3, 32, 32), {"depth": 8}, torch.randn(2, 3, 32, 32)),
    ("cifar_resnet", 7, (1, 28, 28), {"depth": 8, "shortcut": "B", "batch_norm": False},
     torch.randn(2, 1, 28, 28)),
    ("pyramidnet", 10, (3, 32, 32), {"depth": 8, "alpha": 6}, torch.randn(2, 3, 32, 32)),
    ("pyramidnet", 5, (1, 28, 28), {"depth": 11, "alpha": 3.5, "bottleneck": True}, torch.randn(2, 1, 28, 28)),
    ("vit", 10, (3, 32, 32), {"dim": 12, "depth": 2, "heads": 3}, torch.randn(2, 3, 32, 32)),
    ("vit", 4, (1, 28, 20), {"patch_size": 4, "dim": 8, "depth": 1, "heads": 2, "mlp_ratio": 1.5, "dropout": 0.1},
     torch.randn(2, 1, 28, 20)),
]


@pytest.mark.parametrize("name, num_classes, input_shape, options, x", FORWARD,
                         ids=[f"{row[0]}-{i}" for i, row in enumerate(FORWARD)])
def test_output_shapes(name, num_classes, input_shape, options, x):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, input_shape=input_shape, **options)
    out = model(x)
    if name == "char_lstm":
        assert out.shape == (len(x), num_classes, input_shape[0])  # (B, V, T): the class dimension second
    else:
        assert out.shape == (len(x), num_classes)
    assert torch.isfinite(out).all()
    out.float().sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x).shape == out.shape


def test_registry_lists_every_model():
    names = [info.name for info in list_models()]
    assert names == sorted(names) == ["allcnn", "char_lstm", "cifar_resnet", "cnn1d", "lenet5", "mlp", "mlp6",
                                      "mobilenetv2", "pyramidnet", "regnetx", "resnet", "resnet18", "resnext", "vit",
                                      "wideresnet"]
    assert all(info.description for info in list_models())
    assert dict(get_model_info("wideresnet").options) == {"depth": 28, "widen_factor": 10, "dropout": 0.0,
                                                          "batch_norm": True}


@pytest.mark.parametrize("num_classes, expected", [(10, 11_173_962), (100, 11_220_132)])
def test_resnet18_has_the_published_parameter_count(num_classes, expected):
    model = create_model("resnet18", num_classes=num_classes, input_shape=(3, 32, 32))
    assert count(model) == expected  # 11.2M for CIFAR-10
    first = model.stem[0]
    assert (first.kernel_size, first.stride) == ((3, 3), (1, 1)) and not modules(model, nn.MaxPool2d)
    assert len(modules(model, nn.BatchNorm2d)) == 1 + 8 * 2 + 3  # stem, two per block, three projections


def test_wrn_28_10_has_the_published_parameter_count():
    model = create_model("wideresnet", num_classes=10, input_shape=(3, 32, 32))
    assert count(model) == 36_479_194  # 36.5M (Zagoruyko & Komodakis, 2016)
    assert len(modules(model, nn.Conv2d)) == 1 + 12 * 2 + 3  # stem, two per block, three 1x1 projections
    assert not modules(model, nn.Dropout)
    wide = create_model("wideresnet", num_classes=100, input_shape=(3, 32, 32), depth=16, widen_factor=8,
                        dropout=0.3)
    assert count(wide) == 11_007_540  # WRN-16-8, CIFAR-100
    assert {m.p for m in modules(wide, nn.Dropout)} == {0.3} and len(modules(wide, nn.Dropout)) == 6


def _cifar_resnet_size(n: int, classes: int, projections: bool = False) -> int:
    """By hand: 3x3 convolutions without bias, each followed by BN (2 parameters per channel)."""
    def conv(c_in: int, c_out: int) -> int:
        return 9 * c_in * c_out + 2 * c_out

    size = conv(3, 16) + n * 2 * conv(16, 16)
    size += conv(16, 32) + (2 * n - 1) * conv(32, 32) + conv(32, 64) + (2 * n - 1) * conv(64, 64)
    if projections:  # option B: a 1x1 convolution and BN where the stage starts
        size += (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    return size + 64 * classes + classes


@pytest.mark.parametrize("depth, published", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnets_have_the_published_parameter_counts(depth, published):
    """He et al. (2016), Table 6: 0.27M, 0.46M, 0.85M, 1.7M parameters with option A shortcuts."""
    model = create_model("cifar_resnet", num_classes=10, input_shape=(3, 32, 32), depth=depth)
    n = (depth - 2) // 6
    assert count(model) == _cifar_resnet_size(n, 10)  # 464,154 for ResNet-32
    assert round(count(model) / 1e6, 2 if depth < 100 else 1) == published / 1e6
    assert len(modules(model, nn.Conv2d)) == depth - 1  # every weighted layer but the Linear
    assert count(create_model("cifar_resnet", num_classes=100, input_shape=(3, 32, 32), depth=depth,
                              shortcut="B")) == _cifar_resnet_size(n, 100, projections=True)


def test_cifar_resnet_option_a_shortcut_is_the_subsampled_input_between_zero_channels():
    model = create_model("cifar_resnet", num_classes=10, input_shape=(3, 32, 32), depth=8)
    block = model.stages[1][0]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 9, 9)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 5, 5) == block.conv1(x).shape  # odd maps: ceil(9 / 2) like the convolution
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert not list(block.shortcut.parameters())


def _pyramid_size(depth: int, alpha: float, classes: int, bottleneck: bool = False) -> int:
    """By hand from Han et al.'s definition: block k of N has width round(16 + k alpha / N)."""
    blocks = 3 * ((depth - 2) // (9 if bottleneck else 6))
    def bn(c: int) -> int:
        return 2 * c

    size, channels = 9 * 3 * 16 + bn(16), 16  # stem: conv3x3 and BN
    for k in range(1, blocks + 1):
        w = round(16 + k * alpha / blocks)
        if bottleneck:
            size += bn(channels) + channels * w + bn(w) + 9 * w * w + bn(w) + w * 4 * w + bn(4 * w)
            channels = 4 * w
        else:
            size += bn(channels) + 9 * channels * w + bn(w) + 9 * w * w + bn(w)
            channels = w
    return size + bn(channels) + channels * classes + classes


@pytest.mark.parametrize("depth, alpha, bottleneck, exact, published", [
    (110, 48, False, 1_772_706, 1.7e6), (110, 270, False, 28_485_477, 28.3e6),
    (272, 200, True, 26_210_842, 26.0e6)])
def test_pyramidnet_parameter_counts(depth, alpha, bottleneck, exact, published):
    """Han et al. (2017), Table 4, reports 1.7M, 28.3M and 26.0M; the authors' PyTorch code
    (dyhan0920/PyramidNet-PyTorch) builds 1,772,706, 28,485,477 and 26,210,842 parameters for 10 classes
    (counted there on 2026-11-24; the same layer shapes in the same order, and outputs equal to 1e-14 in
    float64 with its weights), about 1-4% above the table's rounded figures."""
    model = create_model("pyramidnet", num_classes=10, input_shape=(3, 32, 32), depth=depth, alpha=alpha,
                         bottleneck=bottleneck)
    assert count(model) == _pyramid_size(depth, alpha, 10, bottleneck) == exact
    assert abs(count(model) / published - 1) < 0.045
    if not bottleneck:
        assert len(modules(model, nn.Conv2d)) == depth - 1
        assert model.fc.in_features == 16 + alpha  # the last block is 16 + alpha wide


def test_pyramidnet_widens_linearly_and_pads_its_shortcuts():
    model = create_model("pyramidnet", num_classes=10, input_shape=(3, 32, 32), depth=20, alpha=27)
    widths = [block.residual[-1].num_features for stage in model.stages for block in stage]
    assert widths == [19, 22, 25, 28, 31, 34, 37, 40, 43]  # 16 + 3k
    block = model.stages[1][0]  # 25 -> 28 channels, stride 2
    x = torch.randn(2, 25, 9, 9)
    with torch.no_grad():
        residual = block.residual(x)
        out = block(x)
    pooled = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)
    assert out.shape == residual.shape == (2, 28, 5, 5)
    torch.testing.assert_close(out - residual, torch.cat([pooled, torch.zeros(2, 3, 5, 5)], 1))
    assert not [m for m in block.residual[:1] if isinstance(m, nn.ReLU)]  # BN first, no ReLU before conv1


def test_vit_s16_has_timm_parameter_count_and_independent_layers():
    """ViT-S/16 at 224 px: 22,050,664 parameters for 1,000 classes (timm's vit_small_patch16_224), by hand:
    patch embedding, class token, 197 position embeddings, 12 layers (2 LayerNorms, qkv, projection, MLP),
    final LayerNorm and head."""
    d, hidden, tokens = 384, 1536, 14 * 14 + 1
    layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    by_hand = (3 * 16 * 16 * d + d) + d + tokens * d + 12 * layer + 2 * d + (d * 1000 + 1000)
    with torch.device("meta"):
        model = create_model("vit", num_classes=1000, input_shape=(3, 224, 224), patch_size=16)
    assert count(model) == by_hand == 22_050_664
    small = create_model("vit", num_classes=10, input_shape=(3, 32, 32), dim=8, depth=3, heads=2)
    first, second = small.encoder[0].linear1.weight, small.encoder[1].linear1.weight
    assert not torch.equal(first, second)  # nn.TransformerEncoder would have copied one layer
    assert small.pos_embed.shape == (1, 65, 8) and float(small.pos_embed.abs().max()) <= 0.04


def test_mlp6_is_the_universal_sam_mnist_network():
    model = create_model("mlp6", num_classes=10, input_shape=(1, 28, 28))
    linears = modules(model, nn.Linear)
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 128)] + [(128, 128)] * 4 + [(128, 10)]
    assert len(modules(model, nn.ReLU)) == 5 and count(model) == 167_818
    assert not modules(model, nn.BatchNorm1d) and not modules(model, nn.Dropout)
    same = create_model("mlp", num_classes=10, input_shape=(1, 28, 28), depth=6)
    assert [type(m) for m in same] == [type(m) for m in model]
    default = create_model("mlp", num_classes=10, input_shape=(1, 28, 28))
    assert [m.out_features for m in modules(default, nn.Linear)] == [128, 128, 10]
    assert len(modules(create_model("mlp6", num_classes=10, input_shape=(1, 28, 28), batch_norm=True),
                       nn.BatchNorm1d)) == 5


def test_mlp_options():
    model = create_model("mlp", num_classes=3, input_shape=(5,), depth=3, width=7, activation="tanh",
                         batch_norm=True, dropout=0.5)
    assert [m.out_features for m in modules(model, nn.Linear)] == [7, 7, 3]
    assert len(modules(model, nn.Tanh)) == 2 and len(modules(model, nn.BatchNorm1d)) == 2
    assert len(modules(model, nn.Dropout)) == 2
    logistic = create_model("mlp", num_classes=3, input_shape=(5,), depth=1)
    assert count(logistic) == 5 * 3 + 3
    linear = create_model("mlp", num_classes=3, input_shape=(5,), activation="identity", depth=3)
    assert not modules(linear, nn.ReLU)


def test_lenet5_is_the_classic_network_on_mnist():
    model = create_model("lenet5", num_classes=10, input_shape=(1, 28, 28))
    assert count(model) == 61_706
    assert model.features[0].padding == (2, 2)  # 28x28 padded to LeNet's 32x32
    assert create_model("lenet5", num_classes=10, input_shape=(3, 32, 32)).features[0].padding == (0, 0)
    with_dropout = create_model("lenet5", num_classes=10, input_shape=(1, 28, 28), dropout=0.2)
    assert len(modules(with_dropout, nn.Dropout)) == 2


def test_batch_norm_options():
    with_bn = create_model("resnet18", num_classes=10, input_shape=(3, 32, 32), width=2)
    without = create_model("resnet18", num_classes=10, input_shape=(3, 32, 32), width=2, batch_norm=False)
    assert modules(with_bn, nn.BatchNorm2d) and not modules(without, nn.BatchNorm2d)
    assert all(conv.bias is not None for conv in modules(without, nn.Conv2d))
    cnn = create_model("cnn1d", num_classes=10, input_shape=(40,), batch_norm=True)
    assert len(modules(cnn, nn.BatchNorm1d)) == 3
    wrn = create_model("wideresnet", num_classes=10, input_shape=(3, 32, 32), depth=10, widen_factor=1,
                       batch_norm=False)
    assert not modules(wrn, nn.BatchNorm2d)


def test_char_lstm_logits_feed_cross_entropy_directly():
    model = create_model("char_lstm", num_classes=11, input_shape=(6,), embedding_dim=4, hidden_size=5,
                         num_layers=3, dropout=0.2)
    assert isinstance(model, CharLSTM) and model.lstm.num_layers == 3 and model.lstm.dropout == 0.2
    x = torch.randint(0, 11, (2, 6))
    y = torch.roll(x, -1, dims=1)
    loss = nn.CrossEntropyLoss()(model(x), y)
    assert loss.shape == () and torch.isfinite(loss)
    single = create_model("char_lstm", num_classes=11, input_shape=(6,), num_layers=1, dropout=0.2)
    assert single.lstm.dropout == 0.0  # nn.LSTM's dropout only acts between layers


@pytest.mark.parametrize("name, kwargs, error, message", [
    ("vgg16", {}, ValueError,
     ("Unknown model name: 'vgg16' "
      "(expected one of allcnn, char_lstm, cifar_resnet, cnn1d, lenet5, mlp, mlp6, mobilenetv2, pyramidnet, "
      "regnetx, resnet, resnet18, resnext, vit, wideresnet)")),
    ("mlp", {"layers": 3}, TypeError,
     ("Unknown option(s) ['layers'] for model 'mlp' "
      "(valid options: depth, width, activation, batch_norm, dropout)")),
    ("mlp", {"activation": "swish"}, ValueError,
     ("Unknown activation name: 'swish' (expected one of elu, gelu, identity, leaky_relu, relu, sigmoid, "
      "silu, softplus, tanh)")),
    ("mlp", {"depth": 0}, ValueError, "Invalid depth value: 0 (expected an integer depth >= 1)"),
    ("mlp", {"dropout": 1.0}, ValueError, "Invalid dropout value: 1.0 (expected 0 <= dropout < 1)"),
    ("mlp", {"batch_norm": 1}, TypeError, "Invalid batch_norm type: int (expected bool)"),
    ("mlp", {"num_classes": 0}, ValueError, "Invalid num_classes value: 0 (expected num_classes >= 1)"),
    ("mlp", {"input_shape": 784}, TypeError, "Invalid input_shape type: 784"),
    ("mlp", {"input_shape": (0, 3)}, ValueError, "Invalid input_shape value: (0, 3)"),
    ("lenet5", {"pooling": "min"}, ValueError, "Unknown pooling name: 'min' (expected one of max, avg)"),
    ("lenet5", {"input_shape": (28, 28)}, ValueError, "Invalid input_shape for 'lenet5': (28, 28)"),
    ("resnet18", {"input_shape": (784,)}, ValueError,
     "Invalid input_shape for 'resnet18': (784,) (expected (C, H, W))"),
    ("cnn1d", {"input_shape": (1, 28, 28)}, ValueError, "expected (L,) or (C, L)"),
    ("wideresnet", {"depth": 27}, ValueError, "Invalid depth value: 27 (expected depth = 6n + 4"),
    ("wideresnet", {"widen_factor": 0}, ValueError, "Invalid widen_factor value: 0"),
    ("char_lstm", {"input_shape": (3, 32, 32)}, ValueError,
     "(expected (block_size,), a sequence of token ids)"),
    ("cifar_resnet", {"depth": 30}, ValueError, "Invalid depth value: 30 (expected depth = 6n + 2"),
    ("cifar_resnet", {"depth": 2}, ValueError, "Invalid depth value: 2 (expected an integer depth >= 8)"),
    ("cifar_resnet", {"shortcut": "C"}, ValueError, "Invalid shortcut value: 'C' (expected one of 'A', 'B')"),
    ("cifar_resnet", {"input_shape": (32, 32)}, ValueError, "Invalid input_shape for 'cifar_resnet'"),
    ("pyramidnet", {"depth": 165}, ValueError, "Invalid depth value: 165 (expected depth = 6n + 2"),
    ("pyramidnet", {"depth": 112, "bottleneck": True}, ValueError,
     "Invalid depth value: 112 (expected depth = 9n + 2"),
    ("pyramidnet", {"alpha": -1}, ValueError, "Invalid alpha value: -1.0 (expected alpha >= 0 and finite)"),
    ("pyramidnet", {"alpha": float("inf")}, ValueError, "Invalid alpha value: inf"),
    ("pyramidnet", {"bottleneck": 1}, TypeError, "Invalid bottleneck type: int (expected bool)"),
    ("vit", {"patch_size": 5}, ValueError,
     "Invalid patch_size value: 5 (expected a divisor of the image's height and width, 32 x 32)"),
    ("vit", {"heads": 5}, ValueError, "Invalid heads value: 5 (expected a divisor of dim = 384)"),
    ("vit", {"mlp_ratio": 0}, ValueError, "Invalid mlp_ratio value: 0.0 (expected mlp_ratio > 0 and finite)"),
    ("vit", {"depth": 0}, ValueError, "Invalid depth value: 0 (expected an integer depth >= 1)"),
    ("vit", {"input_shape": (64,)}, ValueError, "Invalid input_shape for 'vit': (64,) (expected (C, H, W))"),
])
def test_bad_arguments(name, kwargs, error, message):
    kwargs = {"num_classes": 10, "input_shape": (3, 32, 32) if name in ("resnet18", "wideresnet", "lenet5",
                                                                          "cifar_resnet", "pyramidnet", "vit")
              else (40,) if name in ("cnn1d", "char_lstm") else (1, 28, 28), **kwargs}
    with pytest.raises(error) as info:
        create_model(name, **kwargs)
    assert message in str(info.value)


# ResNet-18/34/50/101/152 ("resnet") and ResNeXt-29 ("resnext"), CIFAR variants


def _bn(channels: int) -> int:
    return 2 * channels  # scale and shift


def _bottleneck_size(c_in: int, planes: int, stride: int, groups: int = 1, base_width: int = 64) -> int:
    """By hand: 1x1 reduce, 3x3 in ``groups`` groups, 1x1 expand to 4 planes, BN after each, a 1x1 projection
    with BN where the shape changes; convolutions without bias."""
    inner, out = planes * base_width // 64 * groups, 4 * planes
    size = c_in * inner + _bn(inner) + 9 * inner * inner // groups + _bn(inner) + inner * out + _bn(out)
    return size + (c_in * out + _bn(out) if stride != 1 or c_in != out else 0)


def _resnet_size(depth: int, classes: int) -> int:
    """By hand from He et al. (2016), Table 1, with the CIFAR stem (one 3x3 convolution of 64 channels)."""
    bottleneck = depth >= 50
    stages = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    size, channels = 9 * 3 * 64 + _bn(64), 64
    for index, count in enumerate(stages):
        planes = 64 * 2**index
        for position in range(count):
            stride = 2 if index and not position else 1
            if bottleneck:
                size += _bottleneck_size(channels, planes, stride)
                channels = 4 * planes
            else:
                size += 9 * channels * planes + _bn(planes) + 9 * planes * planes + _bn(planes)
                size += channels * planes + _bn(planes) if channels != planes else 0
                channels = planes
    return size + channels * classes + classes


@pytest.mark.parametrize("depth, published", [(18, 11_173_962), (34, 21_282_122), (50, 23_520_842),
                                              (101, 42_512_970), (152, 58_156_618)])
def test_resnet_depths_have_the_published_parameter_counts(depth, published):
    """kuangliu/pytorch-cifar's CIFAR ResNets: ResNet-50 23,520,842 and ResNet-101 42,512,970 parameters for 10
    classes (23.5M and 42.5M; the SALR and GNR papers' CIFAR ResNet-50 and 101)."""
    with torch.device("meta"):
        model = create_model("resnet", num_classes=10, input_shape=(3, 32, 32), depth=depth)
        assert model(torch.empty(2, 3, 32, 32)).shape == (2, 10)
        hundred = create_model("resnet", num_classes=100, input_shape=(3, 32, 32), depth=depth)
    assert count(model) == _resnet_size(depth, 10) == published
    assert count(hundred) == _resnet_size(depth, 100)
    first = model.stem[0]
    assert (first.kernel_size, first.stride) == ((3, 3), (1, 1)) and not modules(model, nn.MaxPool2d)
    assert len(modules(model, nn.Conv2d)) == depth - 1 + (4 if depth >= 50 else 3)  # + 1x1 projections
    assert model.fc.in_features == (2048 if depth >= 50 else 512)


def test_resnet_bottleneck_strides_on_its_3x3_convolution():
    model = create_model("resnet", num_classes=10, input_shape=(3, 32, 32), width=4)
    assert get_model_info("resnet").options["depth"] == 50
    block = model.stages[1][0]  # 16 -> 32 channels at 8 planes, stride 2 (ResNet v1.5)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.shortcut[0].stride == (2, 2)
    assert [block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels] == [8, 8, 32]
    first = model.stages[0][0]  # 4 -> 16 channels at stride 1: projected too
    assert isinstance(first.shortcut, nn.Sequential) and first.conv2.stride == (1, 1)
    assert isinstance(model.stages[0][1].shortcut, nn.Identity)


def test_resnet_depth_18_is_resnet18():
    """The same weights from the same seed, the same state-dict keys and the same outputs."""
    torch.manual_seed(0)
    old = create_model("resnet18", num_classes=10, input_shape=(3, 32, 32), width=8)
    torch.manual_seed(0)
    new = create_model("resnet", num_classes=10, input_shape=(3, 32, 32), depth=18, width=8)
    old_state, new_state = old.state_dict(), new.state_dict()
    assert list(old_state) == list(new_state) and all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(old(x), new(x))
    old.eval(), new.eval()
    assert torch.equal(old(x), new(x))


def _copy_state(source: nn.Module, target: nn.Module) -> None:
    """Load ``source``'s tensors into ``target`` in order (the same layers in the same order, other names)."""
    values, keys = list(source.state_dict().values()), list(target.state_dict())
    assert [v.shape for v in values] == [v.shape for v in target.state_dict().values()]
    target.load_state_dict(dict(zip(keys, (v.clone() for v in values))), assign=True)


def _randomise_(model: nn.Module) -> None:
    """Random weights, BN affine parameters and running statistics, so that eval mode tests them too."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var") or tensor.dim() == 1 and name.endswith("weight"):  # BN scales
                tensor.uniform_(0.5, 1.5)
            elif tensor.dim() > 1:
                tensor.normal_(0, (2 / tensor[0].numel()) ** 0.5)  # He-normal, fan-in
            else:
                tensor.normal_(0, 0.1)


def _check_same_outputs(reference: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    worst = 0.0
    for train in (True, False):  # batch statistics, then the running statistics both updated alike
        reference.train(train), model.train(train)
        with torch.no_grad():
            expected, out = reference(x), model(x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-10)
        worst = max(worst, float((out - expected).abs().max()))
    return worst


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_matches_torchvision_with_a_cifar_stem(depth):
    """torchvision's ResNet-50/101 (v1.5: stride on the 3x3 convolution) with its stem replaced by a 3x3
    stride-1 convolution of 64 channels and no max pooling is the same network: its weights, loaded in order,
    give our outputs in float64 (equal in practice)."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # no initialisation: both get the same random weights below
        reference = getattr(torchvision.models, f"resnet{depth}")(num_classes=10)
        reference.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        reference.maxpool = nn.Identity()
        model = create_model("resnet", num_classes=10, input_shape=(3, 32, 32), depth=depth)
    reference.to_empty(device="cpu").double()
    torch.manual_seed(0)
    _randomise_(reference)
    _copy_state(reference, model)
    assert count(model) == count(reference)
    _check_same_outputs(reference, model, torch.randn(2, 3, 8, 8, dtype=torch.float64))  # 8, 4, 2, 1 pixels


def _resnext_size(depth: int, cardinality: int, base_width: int, classes: int) -> int:
    """By hand from Xie et al. (2017), section 5.3: a 64-channel 3x3 stem, three stages of (depth - 2) / 9
    bottleneck blocks of 64, 128, 256 planes (4x outputs), C x (d 2**i) grouped 3x3 convolutions."""
    size, channels = 9 * 3 * 64 + _bn(64), 64
    for index in range(3):
        planes = 64 * 2**index
        for position in range((depth - 2) // 9):
            size += _bottleneck_size(channels, planes, 2 if index and not position else 1, cardinality, base_width)
            channels = 4 * planes
    return size + channels * classes + classes


@pytest.mark.parametrize("cardinality, published", [(8, 34.4e6), (16, 68.1e6)])
def test_resnext29_has_the_published_parameter_count(cardinality, published):
    """Xie et al. (2017), Table 7: ResNeXt-29 8x64d 34.4M, 16x64d 68.1M parameters on CIFAR-10; we build
    34,426,698 and 68,155,210 (0.08% off the rounded figures)."""
    with torch.device("meta"):
        model = create_model("resnext", num_classes=10, input_shape=(3, 32, 32), cardinality=cardinality)
        assert model(torch.empty(2, 3, 32, 32)).shape == (2, 10)
        hundred = create_model("resnext", num_classes=100, input_shape=(3, 32, 32), cardinality=cardinality)
    assert count(model) == _resnext_size(29, cardinality, 64, 10)
    assert count(hundred) == _resnext_size(29, cardinality, 64, 100)
    assert abs(count(model) / published - 1) < 0.01
    assert len(modules(model, nn.Conv2d)) == 1 + 9 * 3 + 3  # 29 layers = 28 convolutions + fc; 3 projections


def test_resnext_blocks_are_grouped_bottlenecks():
    model = create_model("resnext", num_classes=10, input_shape=(3, 32, 32), depth=20, cardinality=4,
                         base_width=2)
    assert dict(get_model_info("resnext").options) == {"depth": 29, "cardinality": 8, "base_width": 64,
                                                       "batch_norm": True}
    for index, stage in enumerate(model.stages):
        assert len(stage) == 2
        for block in stage:
            assert block.conv2.groups == 4 and block.conv2.out_channels == 4 * 2 * 2**index  # C x (d 2**i)
            assert block.conv3.out_channels == 256 * 2**index
    assert model.stem[0].out_channels == 64 and model.fc.in_features == 1024
    assert model.stages[2][0].conv2.stride == (2, 2) and model.stages[0][0].conv2.stride == (1, 1)
    # the authors' initialisation: BN at scale 1 and shift 0, zero Linear bias
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in modules(model, nn.BatchNorm2d))
    assert not model.fc.bias.any()


def test_resnext_matches_torchvision_grouped_bottlenecks():
    """torchvision's Bottleneck with ``groups`` and ``base_width`` (its ResNeXt block) is ours: one block of
    ResNeXt-29 8x64d (256 -> 512 channels, stride 2), and a whole small ResNeXt-29 built as torchvision's
    ResNet without its fourth stage, with the CIFAR stem."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

    torch.manual_seed(0)
    with torch.device("meta"):
        ours = create_model("resnext", num_classes=10, input_shape=(3, 32, 32)).stages[1][0]
        downsample = nn.Sequential(nn.Conv2d(256, 512, 1, stride=2, bias=False), nn.BatchNorm2d(512))
        reference = TorchvisionBottleneck(256, 128, stride=2, downsample=downsample, groups=8, base_width=64)
    reference.to_empty(device="cpu").double()
    _randomise_(reference)
    _copy_state(reference, ours)
    assert ours.conv2.groups == 8 and ours.conv2.out_channels == 1024  # 8 groups x (64 x 2) channels
    _check_same_outputs(reference, ours, torch.randn(2, 256, 6, 6, dtype=torch.float64))

    with torch.device("meta"):
        reference = torchvision.models.ResNet(TorchvisionBottleneck, [3, 3, 3, 1], num_classes=10, groups=4,
                                              width_per_group=8)
        reference.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        reference.maxpool = reference.layer4 = nn.Identity()
        reference.fc = nn.Linear(1024, 10)
        model = create_model("resnext", num_classes=10, input_shape=(3, 32, 32), cardinality=4, base_width=8)
    reference.to_empty(device="cpu").double()
    _randomise_(reference)
    _copy_state(reference, model)
    _check_same_outputs(reference, model, torch.randn(2, 3, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("name, options, error, message", [
    ("resnet", {"depth": 20}, ValueError, "Invalid depth value: 20 (expected one of 18, 34, 50, 101, 152)"),
    ("resnet", {"depth": "50"}, TypeError,
     "Invalid depth type: str '50' (expected an integer, one of 18, 34, 50, 101, 152)"),
    ("resnet", {"depth": 50.0}, TypeError, "Invalid depth type: float 50.0"),
    ("resnet", {"depth": True}, TypeError, "Invalid depth type: bool True"),
    ("resnet", {"width": 0}, ValueError, "Invalid width value: 0 (expected an integer width >= 1)"),
    ("resnet", {"batch_norm": 1}, TypeError, "Invalid batch_norm type: int (expected bool)"),
    ("resnet", {"input_shape": (784,)}, ValueError, "Invalid input_shape for 'resnet': (784,) (expected (C, H, W))"),
    ("resnet", {"groups": 2}, TypeError, "Unknown option(s) ['groups'] for model 'resnet'"),
    ("resnext", {"depth": 30}, ValueError,
     "Invalid depth value: 30 (expected depth = 9n + 2 with n >= 1: 11, 20, 29, 38...)"),
    ("resnext", {"depth": 2}, ValueError, "Invalid depth value: 2 (expected an integer depth >= 11)"),
    ("resnext", {"cardinality": 0}, ValueError, "Invalid cardinality value: 0 (expected an integer cardinality >= 1)"),
    ("resnext", {"cardinality": 2.5}, TypeError, "Invalid cardinality type: float 2.5 (expected an integer >= 1)"),
    ("resnext", {"base_width": 0}, ValueError, "Invalid base_width value: 0 (expected an integer base_width >= 1)"),
    ("resnext", {"batch_norm": "no"}, TypeError, "Invalid batch_norm type: str (expected bool)"),
    ("resnext", {"input_shape": (32, 32)}, ValueError, "Invalid input_shape for 'resnext': (32, 32)"),
])
def test_resnet_and_resnext_bad_arguments(name, options, error, message):
    kwargs = {"num_classes": 10, "input_shape": (3, 32, 32), **options}
    with pytest.raises(error) as info, torch.device("meta"):
        create_model(name, **kwargs)
    assert message in str(info.value)


def test_resnet_blocks_reject_options_they_cannot_honour():
    from sharpness.models import Bottleneck, ResNet

    with pytest.raises(ValueError, match=r"Invalid groups and base_width values for BasicBlock: 2, 64 "
                                         r"\(expected 1 and 64; grouped or widened 3x3 convolutions need Bottleneck\)"):
        ResNet((1, 1), 10, groups=2)
    with pytest.raises(ValueError, match=r"Invalid base_width value: 8 \(expected planes \* base_width >= 64, "
                                         r"planes = 4, so that the bottleneck has channels\)"):
        Bottleneck(16, 4, 1, base_width=8)
    narrow = ResNet((1, 1), 10, block=Bottleneck, width=16, groups=2, base_width=32)  # 16 * 32 / 64 * 2 = 16
    assert narrow.stages[0][0].conv2.out_channels == 16 and narrow.stages[1][0].conv2.out_channels == 32
