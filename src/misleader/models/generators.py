"""Image generators of the data-free attacks: DFME's ``GeneratorA`` and DFMS-HL's DCGAN.

* ``GeneratorA``: Truong et al., "Data-Free Model Extraction", CVPR 2021,
  https://arxiv.org/abs/2011.14779 (reference: ``cake-lab/datafree-model-extraction``,
  ``dfme/network/gan.py``; the architecture comes from DFAD, https://arxiv.org/abs/1912.11006).
* ``DCGANGenerator`` / ``DCGANDiscriminator``: Radford et al., https://arxiv.org/abs/1511.06434, in
  the 32x32 form used by Sanyal et al., "Towards Data-Free Model Stealing in a Hard Label Setting",
  CVPR 2022, https://arxiv.org/abs/2204.11022 (reference: ``val-iisc/Hard-Label-Model-Stealing``,
  ``dcgan_model.py``).

All generators end in tanh, so images are in [-1, 1]; the project's oracles and models take images
in [0, 1], so convert with :func:`tanh_to_unit` (or the ``to_unit`` method) before querying.
Parameter names match the references (``l1``/``conv_blocks0..2`` and ``main``), so their
state_dicts load directly.

Generators are not classifiers, so they live in their own registry, :data:`GENERATORS`
(``generator_a``, ``dcgan``), not in ``MODELS``.

Deviations from the reference code:
    * ``GeneratorA`` always ends in tanh (the reference takes the activation as an argument and the
      DFME script passes tanh) and always keeps the final ``BatchNorm2d(nc, affine=False)``
      (``final_bn=True``, the reference default).
    * The DCGAN modules initialise themselves (conv weights N(0, 0.02), BN weight N(1, 0.02), BN bias
      0); the reference applies the same ``weights_init`` from its training script.
    * The DCGAN generator accepts ``z`` of shape (N, nz) as well as (N, nz, 1, 1); the ``ngpu`` /
      DataParallel plumbing is dropped. Only 32x32 images are supported (as in the reference).
    * ``img_size`` is validated with a ``ValueError`` instead of failing later on a shape mismatch.

Implementation note (not a deviation): ``GeneratorA(fast_upsample=True)`` computes each "nearest x2
upsampling, then 3x3 convolution" as four 2x2 convolutions of the *low*-resolution input, one per output
phase (:func:`upsample_conv3x3`): the same function (a nearest-upsampled pixel is seen by the 3x3 kernel
through 1 or 2 of its taps, whose weights are summed first), with 16/36 of the multiply-adds and no
upsampled tensor; outputs differ from the plain path only by float rounding (~1e-6). DFME turns it on
(issue 10: 2x the generator's throughput on CPU); the default stays the plain reference order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from misleader.registry import Registry

#: name -> factory(**keyword-only hyper-parameters) -> generator module.
GENERATORS: Registry[nn.Module] = Registry("generator")


def tanh_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map a tanh image in [-1, 1] to [0, 1]: ``(x + 1) / 2``. Shape is unchanged."""
    return (x + 1) / 2


def _phase_weight(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel -> (4 * O, I, 2, 2): the 2x2 kernel of each output phase (a, b), block ``2a + b``.

    Along one axis, output row ``2i + a`` of "upsample x2, conv3 (pad 1)" reads input rows ``i - 1, i``
    with taps ``(w0, w1 + w2)`` when ``a = 0`` and rows ``i, i + 1`` with taps ``(w0 + w1, w2)`` when ``a = 1``.
    """
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))  # each (O, I, 2, 3)
    return torch.cat([torch.stack(cols, 3) for r in rows
                      for cols in ((r[..., 0], r[..., 1] + r[..., 2]), (r[..., 0] + r[..., 1], r[..., 2]))])


def _phase_view(y: torch.Tensor) -> torch.Tensor:
    """(N, H+1, W+1, 4O) contiguous -> the (N, H, 2, W, 2, O) view ``[n, i, a, j, b, o] = y[n, i+a, j+b, (2a+b)O + o]``."""
    n, h1, w1, c4 = y.shape
    o = c4 // 4
    s_n, s_r, s_c, _ = y.stride()
    return y.as_strided((n, h1 - 1, 2, w1 - 1, 2, o), (s_n, s_r, s_r + 2 * o, s_c, s_c + o, 1), y.storage_offset())


class _InterleavePhases(torch.autograd.Function):
    """(N, H+1, W+1, 4O) phase outputs -> (N, 2H, 2W, O) image (contiguous): one copy each way.

    (autograd's generic ``as_strided`` backward cannot tell that this view does not overlap itself and
    falls back to an index_add over the whole tensor, slower than the convolution it serves.)
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        ctx.y_shape = y.shape
        n, h1, w1, c4 = y.shape
        return _phase_view(y).reshape(n, 2 * (h1 - 1), 2 * (w1 - 1), c4 // 4)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        gy = grad.new_zeros(ctx.y_shape)  # the rows/columns no phase reads get no gradient
        view = _phase_view(gy)
        view.copy_(grad.reshape(view.shape))
        return gy


def upsample_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2))`` (nearest, 3x3, stride 1, padding 1) without the upsampling.

    One 2x2 convolution with the four phase kernels (:func:`_phase_weight`) of the zero-padded low-resolution
    input, then each phase's window is read into its pixels of the output (one strided view, one copy). Exact in real
    arithmetic; 16/36 of the multiply-adds (times ``((H + 1) / H)^2``). Differentiable in ``x`` and ``conv``'s
    parameters.

    Shape: (N, I, H, W) -> (N, O, 2H, 2W), in channels-last memory format.

    Raises:
        ValueError: ``conv`` is not a 3x3, stride-1, padding-1, ungrouped, undilated convolution.
    """
    if (conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1
            or conv.dilation != (1, 1) or conv.padding_mode != "zeros"):
        raise ValueError("upsample_conv3x3 needs a 3x3 convolution with stride 1, padding 1, no groups or dilation")
    n, _, h, w = x.shape
    o = conv.out_channels
    weight = _phase_weight(conv.weight).contiguous(memory_format=torch.channels_last)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, weight, bias, padding=1).contiguous(memory_format=torch.channels_last)  # (N, 4O, H+1, W+1)
    y = y.permute(0, 2, 3, 1)  # (N, H+1, W+1, 4O), contiguous; channel (2a + b) * O + o
    # out[n, i, a, j, b, o] = y[n, i + a, j + b, (2a + b) * O + o]: one strided view of y (no overlap)
    return _InterleavePhases.apply(y).permute(0, 3, 1, 2)


class GeneratorA(nn.Module):
    """DFME / DFAD generator: linear projection, two nearest-neighbour x2 upsamplings, tanh.

    Linear(nz -> 2ngf * (S/4)^2) -> BN -> up x2 -> conv3 2ngf->2ngf, BN, LeakyReLU(0.2) -> up x2
    -> conv3 2ngf->ngf, BN, LeakyReLU(0.2) -> conv3 ngf->nc -> BatchNorm2d(nc, affine=False) -> tanh.

    Args:
        nz: latent dimension.
        ngf: base width (the convolutions use 2 * ngf and ngf channels).
        img_size: output side S; must be a positive multiple of 4 (32, or 28 for MNIST-sized images).
        nc: output channels.
        fast_upsample: compute each "upsample, conv3" pair with :func:`upsample_conv3x3` (same function,
            16/36 of the arithmetic, float rounding differs; see the module's implementation note).

    Shape: z (N, nz) (any shape with N * nz elements) -> (N, nc, S, S).

    Raises:
        ValueError: ``img_size`` is not a positive multiple of 4.
    """

    def __init__(self, *, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3,
                 fast_upsample: bool = False) -> None:
        super().__init__()
        self.fast_upsample = fast_upsample
        if img_size <= 0 or img_size % 4 != 0:
            raise ValueError(
                f"GeneratorA needs img_size to be a positive multiple of 4 (e.g. 28, 32), got {img_size}"
            )
        self.nz, self.ngf, self.img_size, self.nc = nz, ngf, img_size, nc
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, 2 * ngf * self.init_size**2))
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(2 * ngf))
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.BatchNorm2d(nc, affine=False),
        )

    def forward(self, z: torch.Tensor, pre_x: bool = False) -> torch.Tensor:
        """Generate images.

        Args:
            z: latent codes, (N, nz).
            pre_x: return the pre-tanh image (where DFME adds its zeroth-order perturbations).

        Returns:
            (N, nc, S, S): ``tanh`` output in [-1, 1], or the unbounded pre-tanh image if ``pre_x``.
        """
        out = self.l1(z.reshape(z.shape[0], -1))
        out = out.view(out.shape[0], 2 * self.ngf, self.init_size, self.init_size)
        out = self.conv_blocks0(out)
        if self.fast_upsample:
            out = upsample_conv3x3(out, self.conv_blocks1[0])
            out = self.conv_blocks1[2](self.conv_blocks1[1](out))
            img = upsample_conv3x3(out, self.conv_blocks2[0])
            for layer in list(self.conv_blocks2)[1:]:
                img = layer(img)
        else:
            out = self.conv_blocks1(F.interpolate(out, scale_factor=2))
            img = self.conv_blocks2(F.interpolate(out, scale_factor=2))
        return img if pre_x else torch.tanh(img)

    @staticmethod
    def to_unit(x_tanh: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1]; see :func:`tanh_to_unit`."""
        return tanh_to_unit(x_tanh)


def _dcgan_init(m: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02); BN weight N(1, 0.02), bias 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def _check_dcgan_size(img_size: int, who: str) -> None:
    if img_size != 32:
        raise ValueError(
            f"{who} supports img_size=32 only (pad 28x28 images such as MNIST to 32x32), got {img_size}"
        )


class DCGANGenerator(nn.Module):
    """DFMS-HL DCGAN generator for 32x32 images.

    ConvT(nz -> 8ngf, 4, 1, 0) [1 -> 4] -> ConvT(8ngf -> 4ngf) [-> 8] -> ConvT(4ngf -> 2ngf) [-> 16]
    -> ConvT(2ngf -> ngf) [-> 32], each followed by BN + ReLU; then a 1x1 ConvT ngf -> nc and tanh.
    All convolutions are bias-free.

    Args:
        nz: latent dimension.
        ngf: base width.
        nc: output channels.
        img_size: output side; only 32 is supported.

    Shape: z (N, nz) or (N, nz, 1, 1) -> (N, nc, 32, 32), values in [-1, 1].

    Raises:
        ValueError: ``img_size`` is not 32.
    """

    def __init__(self, *, nz: int = 100, ngf: int = 64, nc: int = 3, img_size: int = 32) -> None:
        super().__init__()
        _check_dcgan_size(img_size, "DCGANGenerator")
        self.nz, self.ngf, self.nc, self.img_size = nz, ngf, nc, img_size
        layers: list[nn.Module] = []
        widths = (nz, 8 * ngf, 4 * ngf, 2 * ngf, ngf)
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            # The first layer turns the 1x1 code into 4x4, the others double the resolution.
            stride, padding = (1, 0) if i == 0 else (2, 1)
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(ngf, nc, kernel_size=1, stride=1, padding=0, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, nz) or (N, nz, 1, 1) latent codes -> (N, nc, 32, 32) images in [-1, 1]."""
        return self.main(z.reshape(z.shape[0], self.nz, 1, 1))

    @staticmethod
    def to_unit(x_tanh: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1]; see :func:`tanh_to_unit`."""
        return tanh_to_unit(x_tanh)


class DCGANDiscriminator(nn.Module):
    """DFMS-HL DCGAN discriminator for 32x32 images.

    Conv(nc -> ndf, 4, 2, 1) + LeakyReLU(0.2) [32 -> 16], then three stride-2 convs to 2ndf, 4ndf,
    8ndf each with BN + LeakyReLU(0.2) [-> 8 -> 4 -> 2], then Conv(8ndf -> 1, 2, 2, 0) [-> 1] and a
    sigmoid. All convolutions are bias-free.

    Args:
        nc: input channels.
        ndf: base width.
        img_size: input side; only 32 is supported.

    Shape: (N, nc, 32, 32) in [-1, 1] -> (N,) probabilities of "real" in (0, 1).

    Raises:
        ValueError: ``img_size`` is not 32.
    """

    def __init__(self, *, nc: int = 3, ndf: int = 64, img_size: int = 32) -> None:
        super().__init__()
        _check_dcgan_size(img_size, "DCGANDiscriminator")
        self.nc, self.ndf, self.img_size = nc, ndf, img_size
        layers: list[nn.Module] = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in ((ndf, 2 * ndf), (2 * ndf, 4 * ndf), (4 * ndf, 8 * ndf)):
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [nn.Conv2d(8 * ndf, 1, 2, 2, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, nc, 32, 32) images in [-1, 1] -> (N,) probabilities in (0, 1)."""
        return self.main(x).reshape(-1)


@GENERATORS.register("generator_a")
def generator_a(*, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3) -> nn.Module:
    """DFME's :class:`GeneratorA`."""
    return GeneratorA(nz=nz, ngf=ngf, img_size=img_size, nc=nc)


@GENERATORS.register("dcgan")
def dcgan(*, nz: int = 100, ngf: int = 64, nc: int = 3, img_size: int = 32) -> nn.Module:
    """DFMS-HL's :class:`DCGANGenerator` (pair it with :class:`DCGANDiscriminator`)."""
    return DCGANGenerator(nz=nz, ngf=ngf, nc=nc, img_size=img_size)
