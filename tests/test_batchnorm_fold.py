"""Batch norm folding: faster networks that give the same vectors, and networks it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cbir.encoders import create
from cbir.encoders._batchnorm import fold_batchnorm
from tests.badfiles import photo

IMAGES = [photo(seed=s) for s in range(4)]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _trained_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    """Non-trivial running statistics and affine parameters, as a trained network has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


@pytest.mark.parametrize("name,weights,pairs", [("efficientnet_lite0", "imagenet", 49), ("resnet50", "none", 53)])
def test_folded_encoder_gives_the_same_vectors(name: str, weights: str, pairs: int) -> None:
    folded = create(name, weights=weights, device="cpu")
    plain = create(name, weights=weights, device="cpu", fold_batchnorm=False)
    assert folded.folded_batchnorms == pairs and plain.folded_batchnorms == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules()) >= pairs
    a, b = folded.embed(IMAGES), plain.embed(IMAGES)
    np.testing.assert_allclose(a, b, atol=2e-5)
    assert folded.weights == plain.weights  # the identity is that of the weights as loaded, not as folded


def test_a_batch_norm_with_its_activation_keeps_the_activation() -> None:
    from timm.layers import BatchNormAct2d

    net = nn.Sequential(nn.Conv2d(3, 8, 3), _trained_bn(BatchNormAct2d(8, act_layer=nn.ReLU6), 2),
                        nn.AdaptiveAvgPool2d(1)).eval()
    folded, n = fold_batchnorm(net, X)
    assert n == 1 and isinstance(folded[1], nn.Sequential) and isinstance(folded[1][1], nn.ReLU6)
    with torch.inference_mode():
        torch.testing.assert_close(folded(X), net(X), atol=1e-5, rtol=1e-5)


class _ConvOutputUsedTwice(nn.Module):
    """bn(conv(x)) + conv(x): folding the batch norm into conv would change the second term."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), _trained_bn(nn.BatchNorm2d(4), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_network_that_folding_would_change_is_left_alone() -> None:
    net = _ConvOutputUsedTwice().eval()
    folded, n = fold_batchnorm(net, X)
    assert n == 0 and folded is net and isinstance(net.bn, nn.BatchNorm2d)


def test_a_network_in_training_mode_is_left_alone() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    folded, n = fold_batchnorm(net, X)
    assert n == 0 and folded is net
