"""The decoy variant of MISLEADER: members that answer synthetic (generator-like) inputs *consistently wrongly*.

Method: ``shared/research/misleader-audit.md`` ("What worked on digits"), issue 11; it extends MISLEADER
(Cheng et al., arXiv 2506.02362, https://arxiv.org/abs/2506.02362). Each member ``d`` is trained with its
usual loss (distillation, and with ``lambda > 0`` the MISLEADER attacker term) **plus**

    mu * KL(q(x_b) || softmax(d(x_b)))

on a batch ``x_b`` drawn from a *bank* of images made by randomly initialised generators of the two
data-free attack families (DFME's :class:`~misleader.models.generators.GeneratorA` and DFMS's
:class:`~misleader.models.generators.DCGANGenerator`), where ``q`` is the victim's softmax with the
classes relabelled by a fixed secret derangement ``pi`` (``q[:, pi[c]] = p_victim[:, c]``). Every member
shares ``pi`` (different targets would average away under soft voting). A data-free attacker whose
queries look like the bank copies the relabelled function; honest users on real images are served the
distilled answers.

The bank uses no attack data and no out-of-distribution dataset: it is made by the defender from random
generators and the secret seed. Half of each generator's images are mapped to pixels by ``(x + 1) / 2``
(DFME's default), the other half by ``center + scale * x`` with the victim's normalisation mean / std
(DFME's "normalised" mapping), as configured in :attr:`DecoyConfig.mappings`.

Secrecy: ``pi`` and the bank seed live in the member settings, i.e. in ``plan.json``, ``fingerprint.json``
and the members' ``result.json`` / ``model.json`` -- files of the defense folder that a server reads but
never serves. The manifest's served description (:meth:`misleader.oracle.pipeline.Pipeline.describe`)
does not contain them. If ``pi`` leaks, the protection is gone (an attacker relabels its clone).

Deviations from the prototype in the audit:
    * The bank is made once per member from the same seed (identical in every member) and never refreshed.

Option ``adversarial`` (the audit's proposal 2): a generator (DFME's GeneratorA, small) trained *inside*
defense training, one Adam step per batch, to maximise ``KL(d(G(z)) || s(G(z)))`` between the member and
its inner clone (exact gradients: the defender owns both), with the decoy target on its images
(``mu * KL(q(G(z)) || d(G(z)))``, the victim queried on them). It needs the inner clone (``lambda > 0``).
Not measured at MNIST scale yet.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from misleader.errors import MisleaderError
from misleader.utils import autocast, derive_seed, make_generator

log = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2506.02362"
FAMILIES = ("generator_a", "dcgan")
RELABELS = ("permutation", "collapse")


def random_derangement(k: int, *, generator: torch.Generator) -> list[int]:
    """A uniformly random permutation of ``range(k)`` with no fixed point (rejection sampling), ``k >= 2``."""
    if k < 2:
        raise MisleaderError(f"a decoy relabelling needs at least 2 classes, got {k}")
    while True:
        p = torch.randperm(k, generator=generator)
        if not bool((p == torch.arange(k)).any()):
            return [int(v) for v in p]


def random_collapse(k: int, m: int, *, generator: torch.Generator) -> list[int]:
    """A random map of ``range(k)`` onto ``m`` of its classes with no fixed point (``2 <= m < k``).

    The ``m`` targets are drawn at random; each class goes to a random target other than itself, and every
    target is used. Unlike a derangement the map cannot be undone: it merges classes.
    """
    if not 2 <= m <= k // 2:
        raise MisleaderError(f"a collapsing decoy map needs 2 <= decoy_classes <= {k // 2} (half the {k} classes), "
                             f"got {m}")
    while True:  # rejection: with m <= k / 2 a draw uses every target with probability well above 1 / 2
        targets = [int(t) for t in torch.randperm(k, generator=generator)[:m]]
        pick = torch.randint(2**31 - 1, (k,), generator=generator).tolist()
        out = []
        for c in range(k):  # uniformly among the targets other than c
            others = [t for t in targets if t != c]
            out.append(others[pick[c] % len(others)])
        if len(set(out)) == m:
            return out


def is_derangement(perm: Sequence[int]) -> bool:
    """``perm`` is a permutation of ``range(len(perm))`` with no fixed point."""
    return sorted(perm) == list(range(len(perm))) and all(int(v) != i for i, v in enumerate(perm))


@dataclass(frozen=True)
class DecoyConfig:
    """Settings of the decoy term of one member (stored as ``MemberConfig.decoy``, a plain dict).

    Attributes:
        perm: the secret map ``pi`` (``perm[c]`` is the class that class ``c`` is relabelled to): a derangement
            (``relabel="permutation"``) or a map without fixed points onto fewer classes (``"collapse"``).
        relabel: ``"permutation"`` (the audit's prototype: invertible, so an attacker with a few real images can
            undo it, see :mod:`misleader.attacks.dfme_relabel`) or ``"collapse"`` (``pi`` merges the classes
            into a few: the decoy answers lose the information a relabelling attacker would recover).
        mu: weight of the decoy term.
        bank_seed: seeds the bank's generators and latents (the same in every member).
        bank_size: images in the bank.
        generators: randomly initialised generators making it (alternating over ``families``).
        families: generator families (``generator_a``, ``dcgan``).
        ngf: base width of the bank's generators.
        mappings: ``[center, scale]`` pixel mappings ``clamp(center + scale * x_tanh, 0, 1)``, cycled over
            each generator's images.
        bank_batch: bank images per training step (``None``: the member's batch size).
        adversarial: also train a disagreement-seeking generator inside training (module docstring).
        adv_batch, adv_lr, adv_ngf, adv_nz: its batch per step, Adam learning rate, width and latent size.
        anchors: also distil the victim on *shifted* real training images (:func:`shift_batch`: reduced contrast,
            blur or noise, one per image, drawn per step), with the clean image's victim answer as the target, so
            that honest users' shifted inputs keep their true answers instead of falling into the decoy (issue 11:
            without them the decoys that stop DFME at 2M queries answered 1.4 % of low-contrast test digits right).
        extra_banks: sha256 digests of bank files added to the random bank (the refreshed banks of
            :mod:`misleader.defenses.misleader.decoy_refresh`: images of the defender's own DFME runs), read from
            the ``bank_dir`` given to :func:`make_decoy_trainer` (files ``bank-<sha256[:16]>.safetensors``).
    """

    perm: tuple[int, ...]
    relabel: str = "permutation"
    mu: float = 1.0
    bank_seed: int = 0
    bank_size: int = 8000
    generators: int = 80
    families: tuple[str, ...] = FAMILIES
    ngf: int = 32
    mappings: tuple[tuple[float, float], ...] = ((0.5, 0.5),)
    bank_batch: int | None = None
    adversarial: bool = False
    adv_batch: int = 64
    adv_lr: float = 1e-3
    adv_ngf: int = 16
    adv_nz: int = 64
    extra_banks: tuple[str, ...] = ()
    anchors: bool = False

    def __post_init__(self) -> None:
        problems = []
        k = len(self.perm)
        if self.relabel not in RELABELS:
            problems.append(f"relabel must be one of {', '.join(RELABELS)}, got {self.relabel!r}")
        elif self.relabel == "permutation" and not is_derangement(list(self.perm)):
            problems.append(f"perm must be a permutation of 0..K-1 without fixed points, got {list(self.perm)}")
        elif self.relabel == "collapse" and (
                k < 3 or not 2 <= len(set(self.perm)) < k
                or any(not 0 <= int(v) < k or int(v) == i for i, v in enumerate(self.perm))):
            problems.append(f"perm must map 0..K-1 onto 2..K-1 classes without fixed points, got {list(self.perm)}")
        if not self.mu >= 0:
            problems.append(f"mu must be >= 0, got {self.mu}")
        if self.bank_size < 1 or self.generators < 1 or self.ngf < 1 or self.generators > self.bank_size:
            problems.append(f"bank_size, generators and ngf must be >= 1 with generators <= bank_size, got "
                            f"{self.bank_size}, {self.generators}, {self.ngf}")
        if not self.families or any(f not in FAMILIES for f in self.families):
            problems.append(f"families must be a non-empty subset of {', '.join(FAMILIES)}, got {list(self.families)}")
        if not self.mappings or any(len(m) != 2 or not m[1] > 0 for m in self.mappings):
            problems.append(f"mappings must be [center, scale > 0] pairs, got {self.mappings}")
        if self.adv_batch < 1 or self.adv_ngf < 1 or self.adv_nz < 1 or not self.adv_lr > 0:
            problems.append(f"adv_batch, adv_ngf, adv_nz and adv_lr must be > 0, got {self.adv_batch}, "
                            f"{self.adv_ngf}, {self.adv_nz}, {self.adv_lr}")
        if any(not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h)
               for h in self.extra_banks):
            problems.append(f"extra_banks must be sha256 hex digests, got {list(self.extra_banks)}")
        if self.bank_batch is not None and self.bank_batch < 1:
            problems.append(f"bank_batch must be >= 1, got {self.bank_batch}")
        if problems:
            raise MisleaderError("bad decoy settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecoyConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MisleaderError(f"unknown decoy setting(s) {', '.join(sorted(unknown))}; use "
                                 f"{', '.join(cls.__dataclass_fields__)}")
        if "perm" not in d:
            raise MisleaderError("decoy settings need 'perm' (the secret derangement; the misleader-decoy builder "
                                 "draws it from the seed)")
        kw = dict(d)
        kw["perm"] = tuple(int(v) for v in d["perm"])
        for key in ("families", "extra_banks"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "mappings" in kw:
            kw["mappings"] = tuple((float(c), float(s)) for c, s in kw["mappings"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["perm"], d["families"] = list(self.perm), list(self.families)
        d["mappings"] = [list(m) for m in self.mappings]
        d["extra_banks"] = list(self.extra_banks)
        # defaults added later are left out, so that folders written before them keep their settings
        if self.relabel == "permutation":
            del d["relabel"]
        if not self.anchors:
            del d["anchors"]
        if not self.extra_banks:
            del d["extra_banks"]
        return d


@torch.no_grad()
def make_bank(cfg: DecoyConfig, *, channels: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The decoy bank: (bank_size, C, size, size) float32 images in [0, 1] from random generators.

    Deterministic in ``cfg.bank_seed`` (generated on the CPU, in train mode like a fresh DFME generator,
    whose BatchNorm layers use batch statistics).
    """
    from misleader.models.generators import GENERATORS

    gen = make_generator(cfg.bank_seed)
    per = [cfg.bank_size // cfg.generators + (1 if i < cfg.bank_size % cfg.generators else 0)
           for i in range(cfg.generators)]
    out = []
    with torch.random.fork_rng(devices=[]):
        for i, n in enumerate(per):
            family = cfg.families[i % len(cfg.families)]
            torch.manual_seed(derive_seed(gen))
            try:
                g = GENERATORS.create(family, ngf=cfg.ngf, img_size=size, nc=channels).train()
            except ValueError as exc:
                raise MisleaderError(f"decoy bank: generator {family} cannot make {channels}x{size}x{size} images "
                                     f"({exc}): choose families that fit") from None
            z = torch.randn(n, g.nz, generator=gen)
            x = g(z).float()
            m = torch.arange(n) % len(cfg.mappings)
            centers = torch.tensor([c for c, _ in cfg.mappings])[m].view(-1, 1, 1, 1)
            scales = torch.tensor([s for _, s in cfg.mappings])[m].view(-1, 1, 1, 1)
            out.append((centers + scales * x).clamp_(0.0, 1.0))
    return torch.cat(out).to(device)


@torch.no_grad()
def decoy_targets(teacher: nn.Module, bank: torch.Tensor, perm: Sequence[int], *, batch_size: int = 1024) -> torch.Tensor:
    """``q``: the victim's softmax on ``bank`` (N, C, H, W) with class ``c``'s mass moved to ``perm[c]`` (classes that
    ``perm`` merges add up); (N, K) float32 rows on the simplex."""
    mode = teacher.training
    teacher.eval()
    p = torch.cat([F.softmax(teacher(x).float(), dim=1) for x in bank.split(batch_size)])
    teacher.train(mode)
    return torch.zeros_like(p).index_add_(1, torch.as_tensor(list(perm), device=p.device), p)


#: the anchors' shifts (:func:`shift_batch`): contrast factor towards the image mean, Gaussian blur sigma, Gaussian
#: noise std, each drawn uniformly from its range per image
ANCHOR_SHIFTS: dict[str, tuple[float, float]] = {"contrast": (0.1, 0.9), "blur": (0.3, 2.0), "noise": (0.05, 0.35)}


def shift_batch(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) in [0, 1] shifted by one of :data:`ANCHOR_SHIFTS`, drawn per image (kind and
    strength); same shape, clamped to [0, 1]. Randomness from ``generator`` only (on the CPU)."""
    import kornia

    n = len(x)
    kind = torch.randint(len(ANCHOR_SHIFTS), (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    (c_lo, c_hi), (b_lo, b_hi), (s_lo, s_hi) = ANCHOR_SHIFTS.values()
    noise = torch.randn(x.shape, generator=generator)
    dev, dt = x.device, x.dtype
    c = (c_lo + (c_hi - c_lo) * u).to(dev, dt).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = mean + c * (x - mean)
    sigma = (b_lo + (b_hi - b_lo) * u).to(dev, dt)
    k = 2 * int(math.ceil(3 * b_hi)) + 1
    blur = kornia.filters.gaussian_blur2d(x, (k, k), torch.stack([sigma, sigma], 1))
    noisy = x + (s_lo + (s_hi - s_lo) * u).to(dev, dt).view(n, 1, 1, 1) * noise.to(dev, dt)
    pick = kind.to(dev).view(n, 1, 1, 1)
    out = torch.where(pick == 0, contrast, torch.where(pick == 1, blur, noisy))
    return out.clamp_(0.0, 1.0)


def decoy_loss(d_logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(q || softmax(d))`` averaged over the batch; ``d_logits`` (B, K), ``q`` (B, K) probabilities."""
    logq = q.clamp_min(1e-30).log()
    return (q * (logq - F.log_softmax(d_logits.float(), dim=1))).sum(1).mean()


def decoy_trainer_class():
    """:class:`DecoyMemberTrainer` (defined lazily: it subclasses the trainer, which imports this module's users)."""
    from misleader.defenses.misleader.trainer import MemberTrainer

    class DecoyMemberTrainer(MemberTrainer):
        """A :class:`~misleader.defenses.misleader.trainer.MemberTrainer` whose defense loss adds the decoy term."""

        def __init__(self, *, decoy: DecoyConfig, bank: torch.Tensor, targets: torch.Tensor,
                     generator: torch.Generator, teacher: nn.Module | None = None, image_shape: Sequence[int] = (),
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.decoy, self.bank, self.targets, self.bank_gen = decoy, bank, targets, generator
            self.bank_batch = decoy.bank_batch or self.config.batch_size
            self.teacher, self.adv, self.opt_g = teacher, None, None
            if decoy.adversarial:
                if self.clone is None or teacher is None:
                    raise MisleaderError("decoy adversarial=True needs the inner clone (lambda > 0) and the victim")
                from misleader.models.generators import GeneratorA

                c, h = int(image_shape[0]), int(image_shape[1])
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(generator))
                    self.adv = GeneratorA(nz=decoy.adv_nz, ngf=decoy.adv_ngf, img_size=h, nc=c).to(self.device)
                self.opt_g = torch.optim.Adam(self.adv.parameters(), lr=decoy.adv_lr)

        def _adversarial_images(self) -> torch.Tensor:
            """One generator step towards member/clone disagreement; returns fresh images (detached, in [0, 1])."""
            from misleader.defenses.misleader.losses import attacker_term
            from misleader.models.generators import tanh_to_unit

            z = torch.randn(self.decoy.adv_batch, self.decoy.adv_nz, generator=self.bank_gen).to(self.device)
            self.adv.train()
            x = tanh_to_unit(self.adv(z))
            dis = attacker_term(self.defense(x), self.clone(x))
            grads = torch.autograd.grad(-dis, list(self.adv.parameters()))
            for p, g in zip(self.adv.parameters(), grads):
                p.grad = g
            self.opt_g.step()
            self.last_disagreement = float(dis.detach())
            with torch.no_grad():
                return tanh_to_unit(self.adv(z)).clamp(0, 1)

        def step(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                 x_aug: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            self._clean = (x, y, t_logits)  # the anchors' images and targets (read by extra_loss in this step)
            return super().step(x, y, t_logits, x_aug)

        def anchor_loss(self) -> torch.Tensor:
            """The clean batch's distillation loss on its shifted copy (:func:`shift_batch`), the clean targets kept."""
            from misleader.defenses.misleader.losses import kd_loss

            x, y, t_logits = self._clean
            x_anc = shift_batch(x, generator=self.bank_gen)
            self.defense.train()
            with self._amp():
                d_anc = self.defense(x_anc)
            return kd_loss(d_anc, t_logits, y, temperature=self.config.temperature, alpha=self.config.alpha)

        def extra_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
            if self.decoy.mu == 0 and not self.decoy.anchors:
                return None
            if self.decoy.mu == 0:
                anc = self.anchor_loss()
                return anc, {"anchor_kd": anc.detach()}
            idx = torch.randint(len(self.bank), (min(self.bank_batch, len(self.bank)),), generator=self.bank_gen)
            idx = idx.to(self.bank.device)
            self.defense.train()
            with self._amp():
                d_b = self.defense(self.bank[idx])
            kl = decoy_loss(d_b, self.targets[idx])
            loss, rows = self.decoy.mu * kl, {"decoy_kl": kl.detach()}
            if self.adv is not None:
                x_adv = self._adversarial_images()
                q_adv = decoy_targets(self.teacher, x_adv, self.decoy.perm)
                with self._amp():
                    d_adv = self.defense(x_adv)
                kl_adv = decoy_loss(d_adv, q_adv)
                loss = loss + self.decoy.mu * kl_adv
                rows.update(decoy_adv_kl=kl_adv.detach(), adv_disagreement=torch.tensor(self.last_disagreement))
            if self.decoy.anchors:
                anc = self.anchor_loss()
                loss = loss + anc
                rows["anchor_kd"] = anc.detach()
            return loss, rows

        def state_dict(self) -> dict[str, Any]:
            st = {**super().state_dict(), "bank_gen": self.bank_gen.get_state()}
            if self.adv is not None:
                st.update(adv=self.adv.state_dict(), opt_g=self.opt_g.state_dict())
            return st

        def load_state_dict(self, st: Mapping[str, Any]) -> None:
            super().load_state_dict(st)
            self.bank_gen.set_state(st["bank_gen"])
            if self.adv is not None:
                self.adv.load_state_dict(st["adv"])
                self.opt_g.load_state_dict(st["opt_g"])

    return DecoyMemberTrainer


def bank_file_name(sha256: str) -> str:
    """The file name of a stored bank with this content digest."""
    return f"bank-{sha256[:16]}.safetensors"


def save_bank_file(x: torch.Tensor, bank_dir: str | Path) -> str:
    """Store images (N, C, H, W) in [0, 1] as uint8 in ``bank_dir``; returns the file's sha256 (its name's key)."""
    import hashlib

    from safetensors.torch import save

    from misleader.utils import atomic_write_bytes

    data = save({"x": (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()})
    digest = hashlib.sha256(data).hexdigest()
    Path(bank_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(bank_dir) / bank_file_name(digest), data)
    return digest


def load_bank_file(bank_dir: str | Path, sha256: str, *, shape: Sequence[int]) -> torch.Tensor:
    """A stored bank (float32 (N, *shape) in [0, 1]) after checking its sha256 and its shape.

    Raises:
        MisleaderError: the file is missing, altered, unreadable or holds images of another shape.
    """
    import hashlib

    from safetensors.torch import load

    path = Path(bank_dir) / bank_file_name(sha256)
    if not path.is_file():
        raise MisleaderError(f"decoy bank {path} not found: it is written by the refresh rounds of "
                             "misleader-decoy (--refresh-rounds); rerun the command, or --force to start over")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise MisleaderError(f"decoy bank {path} does not match its sha256: it was altered; --force to start over")
    try:
        x = load(data)["x"]
    except Exception as exc:  # noqa: BLE001 - a corrupt file: one line
        raise MisleaderError(f"decoy bank {path} cannot be read ({exc})") from None
    if x.dtype != torch.uint8 or tuple(x.shape[1:]) != tuple(shape):
        raise MisleaderError(f"decoy bank {path} holds {x.dtype} {tuple(x.shape)}, not uint8 (N, {tuple(shape)})")
    return x.float() / 255.0


def make_decoy_trainer(*, decoy: Mapping[str, Any], teacher: nn.Module, input_shape: Sequence[int],
                       generator: torch.Generator, device: torch.device, bank_dir: str | Path | None = None,
                       **kwargs: Any):
    """The decoy member trainer: builds the bank (``input_shape`` (C, H, W)) and its targets on ``device``.

    ``bank_dir``: where the ``extra_banks`` files of the settings are (required when there are any).
    """
    cfg = DecoyConfig.from_dict(decoy)
    c, h, w = (int(s) for s in input_shape)
    if h != w:
        raise MisleaderError(f"decoy bank generators make square images, the victim takes {c}x{h}x{w}")
    bank = make_bank(cfg, channels=c, size=h, device=device)
    if cfg.extra_banks:
        if bank_dir is None:
            raise MisleaderError("these decoy settings add stored banks (extra_banks): train them through "
                                 "misleader-decoy --refresh-rounds, which knows where the banks are")
        bank = torch.cat([bank] + [load_bank_file(bank_dir, d, shape=(c, h, w)).to(device) for d in cfg.extra_banks])
    with autocast(device, False):
        targets = decoy_targets(teacher.to(device), bank, cfg.perm)
    log.info("decoy bank: %d images (%d stored) from %d random generators (%s), mu=%g", len(bank),
             len(bank) - cfg.bank_size, cfg.generators, ",".join(cfg.families), cfg.mu)
    return decoy_trainer_class()(decoy=cfg, bank=bank, targets=targets, generator=generator, device=device,
                                 teacher=teacher, image_shape=(c, h, w), **kwargs)


__all__ = ["ANCHOR_SHIFTS", "DecoyConfig", "FAMILIES", "RELABELS", "bank_file_name", "decoy_loss", "decoy_targets",
           "decoy_trainer_class", "is_derangement", "load_bank_file", "make_bank", "make_decoy_trainer",
           "random_collapse", "random_derangement", "save_bank_file", "shift_batch"]
