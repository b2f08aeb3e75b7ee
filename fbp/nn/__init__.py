"""Layers: one file per family, each layer's backward beside its forward."""

from fbp.core import Layer
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
from fbp.nn.attention import MultiHeadAttention, TransformerBlock
from fbp.nn.combinators import Parallel, Residual, Serial
from fbp.nn.conv import Conv1D, Conv2D, ConvTranspose2D
from fbp.nn.dense import Dense
from fbp.nn.dropout import Dropout
from fbp.nn.embedding import Embedding
from fbp.nn.function import FunctionLayer, layer
from fbp.nn.gated import GRU, LSTM
from fbp.nn.hooks import GradientReversal, MapCotangent, ScaleGradient, StopGradient
from fbp.nn.norm import BatchNorm, GroupNorm, LayerNorm
from fbp.nn.pooling import AvgPool2D, Flatten, GlobalAvgPool, MaxPool2D, Reshape
from fbp.nn.positional import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding
from fbp.nn.quantize import QuantizeWeights, Round, Sign
from fbp.nn.recurrent import LastStep, SimpleRNN
from fbp.nn.remat import Remat

__all__ = [
    "Activation", "AvgPool2D", "BatchNorm", "Conv1D", "Conv2D", "ConvTranspose2D", "Dense", "Dropout", "ELU",
    "Embedding", "Flatten", "FunctionLayer", "GELU", "GlobalAvgPool", "GroupNorm", "Identity", "Layer", "LayerNorm",
    "LeakyReLU", "LogSoftmax", "MaxPool2D", "Parallel", "ReLU", "Reshape", "Residual", "Serial", "SiLU", "Sigmoid",
    "Softmax", "Softplus", "Tanh", "init", "layer",
    "GRU", "LSTM", "LastStep", "LearnedPositionalEmbedding", "MultiHeadAttention", "SimpleRNN",
    "SinusoidalPositionalEmbedding", "TransformerBlock",
    "GradientReversal", "MapCotangent", "QuantizeWeights", "Round", "ScaleGradient", "Sign", "StopGradient",
    "Remat",
]
