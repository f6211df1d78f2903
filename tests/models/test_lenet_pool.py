"""LeNet-5's fast 2x2 max-pool and pool-before-ReLU layout compute exactly the reference function.

The reference is the layout of the DAFL/DFME/MISLEADER code: conv, ReLU, ``nn.MaxPool2d(2, 2)``.
Values, parameter gradients and double-backward gradients must be bit-identical, ties included
(flat image regions give equal activations in a pooling window).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from misleader.models import create_model
from misleader.models.lenet import LeNet5, MaxPool2x2

LENETS = ("lenet5", "lenet5_half", "lenet5_fifth")


def _net(model: nn.Module) -> LeNet5:
    return model.net if hasattr(model, "net") else model


def _reference_layout(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the reference layout: conv, ReLU, nn.MaxPool2d (same parameters)."""
    ref = copy.deepcopy(model)
    f = _net(ref).features
    _net(ref).features = nn.Sequential(f[0], nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
                                       f[3], nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), f[6], f[7])
    return ref


def _images_with_ties(n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 32, 32, generator=g)
    x[:, :, :12] = 0.0  # background: equal activations (ties) in every window there
    x[: n // 4] = 0.5  # flat images
    x[:, :, 20:, 20:] = 1.0  # saturated block
    return x


@pytest.mark.parametrize("shape", [(4, 3, 28, 28), (3, 2, 11, 9), (2, 1, 2, 2), (2, 5, 10, 10)])
def test_maxpool2x2_matches_max_pool2d_values_and_gradients(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, shape, generator=g).float().requires_grad_()  # many ties
    ref = F.max_pool2d(x, 2, 2)
    out = MaxPool2x2()(x)
    assert torch.equal(out, ref)
    up = torch.randn(ref.shape, generator=g)
    (g_ref,) = torch.autograd.grad(ref, x, up)
    (g_out,) = torch.autograd.grad(out, x, up)
    assert torch.equal(g_out, g_ref)


def test_maxpool2x2_gradcheck_and_double_backward():
    x = torch.randn(2, 2, 6, 7, dtype=torch.double, requires_grad=True)
    pool = MaxPool2x2()
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))


def test_maxpool2x2_is_a_maxpool2d_module():
    pool = MaxPool2x2()
    assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 2 and pool.stride == 2
    with torch.no_grad():
        out = pool(torch.arange(16.0).view(1, 1, 4, 4))
    assert torch.equal(out, torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))


@pytest.mark.parametrize("arch", LENETS)
def test_lenet_is_bit_identical_to_the_reference_layout(arch):
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=10)
    ref = _reference_layout(model)
    assert list(model.state_dict()) == list(ref.state_dict())
    x = _images_with_ties()
    out, out_ref = model(x), ref(x)
    assert torch.equal(out, out_ref)
    y = torch.arange(len(x)) % 10
    loss, loss_ref = F.cross_entropy(out, y), F.cross_entropy(out_ref, y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    grads_ref = torch.autograd.grad(loss_ref, list(ref.parameters()), create_graph=True)
    for a, b in zip(grads, grads_ref):
        assert torch.equal(a, b)
    # double backward (as GRAD2 uses): the gradient of the squared gradient norm
    gg = torch.autograd.grad(sum(g.square().sum() for g in grads), list(model.parameters()))
    gg_ref = torch.autograd.grad(sum(g.square().sum() for g in grads_ref), list(ref.parameters()))
    for a, b in zip(gg, gg_ref):
        assert torch.equal(a, b)
