"""Models for the harness by name: ``list_models()`` and ``create_model(name, num_classes=, input_shape=)``.

``mlp``, ``mlp6`` (the universal-SAM MNIST network), ``lenet5``, ``cnn1d`` (MNIST-1D), ``resnet18`` (CIFAR
variant), ``cifar_resnet`` (He et al.'s ResNet-20/32/.../110, ResNet-32 by default), ``pyramidnet``
(PyramidNet-110, alpha 270 by default), ``vit`` (ViT-S by default), ``wideresnet`` (WRN-28-10 by default),
``char_lstm`` (Tiny Shakespeare). Every model returns logits with the class dimension second.
"""

from .char_lstm import CharLSTM
from .cifar_resnet import CifarResNet
from .cnn1d import CNN1d
from .lenet import LeNet5
from .mlp import MLP
from .pyramidnet import PyramidNet
from .registry import ModelInfo, create_model, get_model_info, list_models, register_model
from .resnet import BasicBlock, ResNet
from .vit import ViT
from .wideresnet import WideBasic, WideResNet

__all__ = [
    "MLP",
    "BasicBlock",
    "CNN1d",
    "CharLSTM",
    "CifarResNet",
    "LeNet5",
    "ModelInfo",
    "PyramidNet",
    "ResNet",
    "ViT",
    "WideBasic",
    "WideResNet",
    "create_model",
    "get_model_info",
    "list_models",
    "register_model",
]
