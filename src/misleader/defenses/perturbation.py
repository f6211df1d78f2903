"""Per-sample random perturbation networks (MeCo's ``perturbnet``) and ACT's watermark network.

MeCo (Wang et al., NeurIPS 2023, https://nips.cc/virtual/2023/poster/72719) and ACT (Wang, Wu & Huang,
ICML 2024, https://proceedings.mlr.press/v235/wang24cb.html) answer ``f(x + scale * R(x))`` where ``R`` is a tiny convolutional net.
Its architecture (reference ``teacher-train/perturbnet.py``) is two blocks of::

    1x1 conv C->h -> norm -> ReLU -> 3x3 dilation-2 conv h->h -> norm -> ReLU -> 1x1 conv h->C -> norm

with ``R(x) = block2(block1(x) * eps) * eps``, ``eps ~ U[lo, hi]`` (``eps=None``: no factor, the MeCo DFME
harness). Every sample gets its own filters (a grouped convolution with ``groups = N``, computed as one
batched matrix product per layer), so ``R`` works for *any* batch size.

``norm`` is ``"instance"`` (per sample and channel over H, W: what the reference's BatchNorm in train mode
computes on its ``[1, B*C, H, W]`` view) or ``"none"`` (ACT's served ``Res2Net_weight``: BatchNorm in eval
mode with freshly reset running statistics, i.e. the identity up to ``1/sqrt(1 + 1e-5)``).

The reference works on *normalised* inputs. Our models normalise inside, so a step entry carries the
model's ``mean``/``std``: ``x' = x + scale * std * R((x - mean) / std)``, which is exactly
``x_n + scale * R(x_n)`` in the reference's normalised space.

Deviations from the reference code:
    * Any batch size (the reference's ``perturbnet`` only accepts exactly ``batch_size`` rows).
    * ``eps`` is drawn per sample (the reference draws one per call); weights are drawn like PyTorch's
      default conv initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, and
      ``weight_noise`` adds Gaussian noise with ``weight_noise`` times that distribution's std
      (``perturbnet_weight.py``: 2.25 in MeCo's DFME harness, 1.0 for ACT's posterior sample).
    * All random draws come from the folder's seeded generator: a fresh net for every query batch,
      reproducible when the folder is reopened.
    * The learnable watermark net (:class:`WatermarkNet`) uses instance normalisation in training and when
      served (the reference's BatchNorm in eval mode would use running statistics collected over the
      ``[1, B*C, H, W]`` view).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from misleader.errors import MisleaderError
from misleader.oracle.steps import InputStep, StepContext, register_step

#: (kernel, dilation, padding) of the three convolutions of one block
_LAYERS = ((1, 1, 0), (3, 2, 2), (1, 1, 0))
NORMS = ("instance", "none")


def _layer_shapes(in_channels: int, hidden: int) -> list[tuple[int, int, int, int, int]]:
    """(out, in, k, dilation, padding) for the 6 convolutions of two blocks."""
    chans = ((hidden, in_channels), (hidden, hidden), (in_channels, hidden))
    return [(o, i, k, d, p) for _ in range(2) for (o, i), (k, d, p) in zip(chans, _LAYERS)]


def draw_weights(n: int, *, in_channels: int, hidden: int, generator: torch.Generator,
                 weight_noise: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` independent random nets: per layer ``(w (n, out, in, k, k), b (n, out))`` on the generator's device."""
    dev = generator.device
    out = []
    for o, i, k, _, _ in _layer_shapes(in_channels, hidden):
        bound = 1.0 / math.sqrt(i * k * k)
        w = (torch.rand(n, o, i, k, k, generator=generator, device=dev) * 2 - 1) * bound
        b = (torch.rand(n, o, generator=generator, device=dev) * 2 - 1) * bound
        if weight_noise:
            w = w + torch.randn(w.shape, generator=generator, device=dev) * (weight_noise * bound / math.sqrt(3))
        out.append((w, b))
    return out


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, dilation: int, padding: int) -> torch.Tensor:
    """Per-sample convolution: x (N, I, H, W), w (N or 1, O, I, k, k), b (N or 1, O) -> (N, O, H, W).

    Shared weights (leading dim 1) are one ordinary convolution; per-sample weights are a batched matrix
    product over the (unfolded) input, the same numbers as a grouped convolution with ``groups = N`` and
    faster on CPU.
    """
    n, i, h, wd = x.shape
    if w.shape[0] == 1:
        return F.conv2d(x, w[0], b[0], padding=padding, dilation=dilation)
    o, k = w.shape[1], w.shape[-1]
    cols = x.reshape(n, i, h * wd) if k == 1 else F.unfold(x, k, dilation=dilation, padding=padding)
    y = torch.bmm(w.reshape(n, o, i * k * k), cols) + b.unsqueeze(2)
    return y.reshape(n, o, h, wd)


def perturbation_net(x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                     eps: torch.Tensor | None, norm: str) -> torch.Tensor:
    """``R(x) = block2(block1(x) * eps) * eps``: (N, C, H, W) -> (N, C, H, W).

    Args:
        weights: from :func:`draw_weights` (per sample) or a :class:`WatermarkNet` (leading dim 1, shared).
        eps: (N,) factors, or ``None`` for none.
        norm: ``"instance"`` or ``"none"`` (see the module docstring).
    """
    e = None if eps is None else eps.to(x.dtype).view(-1, 1, 1, 1)
    y = x
    for j, ((w, b), (_, _, _, d, p)) in enumerate(zip(weights, _layer_shapes(x.shape[1], weights[0][0].shape[1]))):
        y = _conv(y, w, b, dilation=d, padding=p)
        if norm == "instance":
            y = F.instance_norm(y, eps=1e-5)
        if j % 3 != 2:
            y = F.relu(y)
        elif e is not None:
            y = y * e
    return y


def perturb(x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]], *, eps: torch.Tensor | None,
            scale: float, mean: torch.Tensor, std: torch.Tensor, norm: str) -> torch.Tensor:
    """``x + scale * std * R((x - mean) / std)``: the reference's ``x_n + scale * R(x_n)`` in pixel units.

    Shapes: x (N, C, H, W); mean, std (1, C, 1, 1).
    """
    return x + scale * std * perturbation_net((x - mean) / std, weights, eps=eps, norm=norm)


def random_perturb(x: torch.Tensor, *, generator: torch.Generator, hidden: int, eps: tuple[float, float] | None,
                   weight_noise: float, scale: float, mean: torch.Tensor, std: torch.Tensor,
                   norm: str = "instance") -> torch.Tensor:
    """:func:`perturb` with a freshly drawn random net per sample (and ``eps`` per sample) from ``generator``."""
    w = [(a.to(x.device), b.to(x.device)) for a, b in draw_weights(len(x), in_channels=x.shape[1], hidden=hidden,
                                                                   generator=generator, weight_noise=weight_noise)]
    e = _draw_eps(len(x), eps, generator)
    return perturb(x, w, eps=None if e is None else e.to(x.device), scale=scale, mean=mean.to(x.device),
                   std=std.to(x.device), norm=norm)


def _draw_eps(n: int, eps: tuple[float, float] | None, generator: torch.Generator) -> torch.Tensor | None:
    if eps is None:
        return None
    lo, hi = eps
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)


def _stats(v: Any, c: int, key: str, default: float) -> torch.Tensor:
    if v is None:
        return torch.full((1, c, 1, 1), default)
    if not isinstance(v, list) or len(v) != c or not all(isinstance(t, (int, float)) for t in v):
        raise MisleaderError(f"perturbation step: {key!r} must be a list of {c} numbers, got {v!r}: fix the manifest")
    return torch.tensor([float(t) for t in v], dtype=torch.float32).view(1, c, 1, 1)


class _PerturbSettings:
    """Validated settings shared by the random and the trained perturbation steps."""

    def __init__(self, spec: dict[str, Any], *, ctx: StepContext, where: str) -> None:
        c = int(ctx.input_shape[0])
        scale, eps, norm = spec.get("scale"), spec.get("eps"), spec.get("norm", "instance")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 10:
            raise MisleaderError(f"{where}: 'scale' must be a number in [0, 10], got {scale!r}: fix the manifest")
        if eps is not None and not (isinstance(eps, list) and len(eps) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in eps) and 0 <= eps[0] <= eps[1]):
            raise MisleaderError(f"{where}: 'eps' must be null or [lo, hi] with 0 <= lo <= hi, got {eps!r}")
        if norm not in NORMS:
            raise MisleaderError(f"{where}: 'norm' must be one of {', '.join(NORMS)}, got {norm!r}")
        self.scale, self.norm = float(scale), norm
        self.eps = None if eps is None else (float(eps[0]), float(eps[1]))
        self.mean_list, self.std_list = spec.get("mean"), spec.get("std")
        self.mean = _stats(self.mean_list, c, "mean", 0.0).to(ctx.device)
        self.std = _stats(self.std_list, c, "std", 1.0).to(ctx.device)
        if (self.std <= 0).any():
            raise MisleaderError(f"{where}: 'std' must be positive: fix the manifest")

    def apply(self, x: torch.Tensor, weights, eps: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        return perturb(x, weights, eps=eps, scale=self.scale, mean=self.mean, std=self.std, norm=self.norm)

    def to_manifest(self) -> dict[str, Any]:
        return {"scale": self.scale, "eps": None if self.eps is None else list(self.eps), "norm": self.norm,
                "mean": self.mean_list, "std": self.std_list}


@register_step
class RandomPerturbation(InputStep):
    """``x + scale * std * R((x - mean) / std)`` with a fresh random ``R`` per sample for every query batch.

    Manifest entry::

        {"kind": "input", "type": "random_perturbation", "scale": 0.5, "hidden": 2, "eps": [0.3, 0.6] | null,
         "weight_noise": 0.0, "norm": "instance" | "none", "mean": [..] | null, "std": [..] | null}

    Shape: (N, C, H, W) -> (N, C, H, W), any N.
    """

    type_name: ClassVar[str] = "random_perturbation"
    stochastic: ClassVar[bool] = True
    test_spec: ClassVar[dict[str, Any] | None] = {"scale": 0.5, "hidden": 2, "eps": [0.3, 0.6], "weight_noise": 1.0,
                                                  "norm": "instance", "mean": [0.5], "std": [0.25]}

    def __init__(self, settings: _PerturbSettings, *, hidden: int, weight_noise: float,
                 generator: torch.Generator) -> None:
        self.settings, self.hidden, self.weight_noise = settings, hidden, weight_noise
        self.__generator = generator

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "RandomPerturbation":
        where = "input step 'random_perturbation'"
        hidden, noise = spec.get("hidden", 2), spec.get("weight_noise", 0.0)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= 64:
            raise MisleaderError(f"{where}: 'hidden' must be an integer in [1, 64], got {hidden!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 100:
            raise MisleaderError(f"{where}: 'weight_noise' must be a number in [0, 100], got {noise!r}")
        return cls(_PerturbSettings(spec, ctx=ctx, where=where), hidden=hidden, weight_noise=float(noise),
                   generator=ctx.generator)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        st = self.settings
        return random_perturb(x, generator=self.__generator, hidden=self.hidden, eps=st.eps,
                              weight_noise=self.weight_noise, scale=st.scale, mean=st.mean, std=st.std, norm=st.norm)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "input", "type": self.type_name, **self.settings.to_manifest(), "hidden": self.hidden,
                "weight_noise": self.weight_noise}


class WatermarkNet(nn.Module):
    """ACT's learnable watermark net: the same two blocks with weights shared by all samples.

    Shape: normalised (N, C, H, W) -> (N, C, H, W); ``eps`` (N,) or ``None``.
    """

    def __init__(self, *, in_channels: int, hidden: int = 2, generator: torch.Generator | None = None) -> None:
        super().__init__()
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.in_channels, self.hidden = in_channels, hidden
        init = draw_weights(1, in_channels=in_channels, hidden=hidden, generator=g)
        self.weights = nn.ParameterList([nn.Parameter(t.clone()) for wb in init for t in wb])

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        p = list(self.weights)
        return [(p[2 * j], p[2 * j + 1]) for j in range(len(p) // 2)]

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        return perturbation_net(x, self.pairs(), eps=eps, norm="instance")


@register_step
class TrainedWatermark(InputStep):
    """ACT served with its *trained* watermark net: ``x + scale * std * W((x - mean) / std)``.

    Manifest entry (the weights file lies inside the folder and is checked against its sha256)::

        {"kind": "input", "type": "trained_watermark", "file": "act/watermark.safetensors", "sha256": "...",
         "hidden": 2, "scale": 1.0, "eps": [0.3, 0.6] | null, "norm": "instance", "mean": [..], "std": [..]}
    """

    type_name: ClassVar[str] = "trained_watermark"
    stochastic: ClassVar[bool] = True  # eps is drawn per sample (deterministic when eps is null)
    test_spec: ClassVar[dict[str, Any] | None] = {"hidden": 2, "scale": 0.5, "eps": [0.3, 0.6], "norm": "instance",
                                                 "mean": [0.5], "std": [0.25]}

    @classmethod
    def conformance_entry(cls, *, ctx: StepContext) -> dict[str, Any] | None:
        """:attr:`test_spec` with a random watermark net written to ``ctx.folder`` (conformance test)."""
        from misleader.defenses.retrain import save_tensors

        spec = dict(cls.test_spec or {})
        g = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=ctx.generator)))
        net = WatermarkNet(in_channels=int(ctx.input_shape[0]), hidden=spec["hidden"], generator=g)
        return {**spec, **save_tensors(net, out=ctx.folder, rel="act/watermark.safetensors")}

    def __init__(self, settings: _PerturbSettings, net: WatermarkNet, *, ref: dict[str, Any],
                 generator: torch.Generator) -> None:
        self.settings, self.ref = settings, ref
        self.__net = net
        self.__generator = generator

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "TrainedWatermark":
        from misleader.defenses.retrain import load_tensors

        where = "input step 'trained_watermark'"
        settings = _PerturbSettings(spec, ctx=ctx, where=where)
        hidden = spec.get("hidden")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= 64:
            raise MisleaderError(f"{where}: 'hidden' must be an integer in [1, 64], got {hidden!r}")
        net = WatermarkNet(in_channels=int(ctx.input_shape[0]), hidden=hidden)
        load_tensors(net, folder=ctx.folder, entry=spec, where=where)
        ref = {"file": spec["file"], "sha256": spec["sha256"], "hidden": hidden}
        return cls(settings, net.to(ctx.device).eval(), ref=ref, generator=ctx.generator)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        eps = _draw_eps(len(x), self.settings.eps, self.__generator)
        return self.settings.apply(x, self.__net.pairs(), None if eps is None else eps.to(x.device))

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "input", "type": self.type_name, **self.ref, **self.settings.to_manifest()}


__all__ = ["NORMS", "RandomPerturbation", "TrainedWatermark", "WatermarkNet", "draw_weights", "perturb",
           "perturbation_net", "random_perturb"]
