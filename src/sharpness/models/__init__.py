"""Models for the harness by name: ``list_models()`` and ``create_model(name, num_classes=, input_shape=)``.

``mlp``, ``mlp6`` (the universal-SAM MNIST network), ``lenet5``, ``cnn1d`` (MNIST-1D), ``resnet18`` (CIFAR
variant), ``resnet`` (ResNet-18/34/50/101/152, ResNet-50 by default), ``resnext`` (ResNeXt-29 8x64d by
default), ``cifar_resnet`` (He et al.'s ResNet-20/32/.../110, ResNet-32 by default), ``pyramidnet``
(PyramidNet-110, alpha 270 by default), ``vit`` (ViT-S by default), ``wideresnet`` (WRN-28-10 by default),
``allcnn`` (All-CNN-BN), ``mobilenetv2`` and ``regnetx`` (RegNetX-200MF by default; CIFAR variants),
``char_lstm`` (Tiny Shakespeare). Every model returns logits with the class dimension second.
"""

from .allcnn import AllCNN
from .char_lstm import CharLSTM
from .cifar_resnet import CifarResNet
from .cnn1d import CNN1d
from .lenet import LeNet5
from .mlp import MLP
from .mobilenetv2 import InvertedResidual, MobileNetV2
from .pyramidnet import PyramidNet
from .registry import ModelInfo, create_model, get_model_info, list_models, register_model
from .regnet import RegNetX, XBlock
from .resnet import BasicBlock, Bottleneck, ResNet
from .resnext import ResNeXt
from .vit import ViT
from .wideresnet import WideBasic, WideResNet

__all__ = [
    "MLP",
    "AllCNN",
    "BasicBlock",
    "Bottleneck",
    "CNN1d",
    "CharLSTM",
    "CifarResNet",
    "InvertedResidual",
    "LeNet5",
    "MobileNetV2",
    "ModelInfo",
    "PyramidNet",
    "RegNetX",
    "ResNeXt",
    "ResNet",
    "ViT",
    "WideBasic",
    "WideResNet",
    "XBlock",
    "create_model",
    "get_model_info",
    "list_models",
    "register_model",
]
