"""Layers: one file per family, each layer's backward beside its forward."""

from fbp.core import FunctionLayer, Layer, layer
from fbp.nn import init
from fbp.nn.activations import (
    ELU,
    GELU,
    Activation,
    Identity,
    LeakyReLU,
    LogSoftmax,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
)
from fbp.nn.combinators import Serial
from fbp.nn.dense import Dense

__all__ = [
    "Activation", "Dense", "ELU", "FunctionLayer", "GELU", "Identity", "Layer", "LeakyReLU",
    "LogSoftmax", "ReLU", "Serial", "SiLU", "Sigmoid", "Softmax", "Softplus", "Tanh", "init", "layer",
]
