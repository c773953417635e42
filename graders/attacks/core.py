"""What every attack of the defense suite shares: the threat-model ball, the losses, the model
wrapper that runs (and counts) forward and backward passes, and the ``Attack`` base class.

Images are float32 NCHW tensors in [0, 1]; models take such images and return logits (any
normalization lives inside the model). Epsilons here are on the [0, 1] scale.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graders.threat_model import Norm, ThreatModel

LossFn = Callable[[Tensor], Tensor]
"""Maps a batch of logits (N x C, fp32) to one loss value per point (N,), to be maximized."""

_DLR_EPS = 1e-12


class AttackName(StrEnum):
    """The attacks the suites are built from; the names stored with every per-attack result."""

    PGD = "pgd"
    APGD_CE = "apgd-ce"
    APGD_DLR = "apgd-dlr"
    APGD_T = "apgd-t"
    FAB_T = "fab-t"
    SQUARE = "square"


def lp_norms(delta: Tensor, norm: Norm) -> Tensor:
    """Per-point size of a perturbation batch: largest absolute entry (L-inf) or L2 norm."""
    flat = delta.flatten(1)
    if norm is Norm.LINF:
        return flat.abs().amax(dim=1)
    return flat.norm(p=2, dim=1)


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (bools refused), else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def fraction_true(mask: Tensor) -> float:
    """The share of true entries, computed exactly from counts (no float32 mean); 0 if empty."""
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


@dataclass(frozen=True)
class Ball:
    """The feasible set around each clean image: an ``norm`` ball of radius ``eps`` on the [0, 1]
    scale, intersected with the image box [0, 1]."""

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be finite and >= 0 on the [0, 1] scale, got {self.eps!r}")

    @classmethod
    def of(cls, threat_model: ThreatModel) -> Ball:
        """The ball of a threat model given on the 0-255 scale (8 becomes 8/255)."""
        return cls(threat_model.norm, threat_model.eps_unit)

    def scaled(self, eps: float) -> Ball:
        """The same norm with another radius (for eps sweeps)."""
        return Ball(self.norm, eps)

    def norms(self, delta: Tensor) -> Tensor:
        """Per-point size of a perturbation batch in this ball's norm."""
        return lp_norms(delta, self.norm)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """The nearest point of the ball (L-inf: clipping; L2: radial rescaling), then the box.

        Clipping to [0, 1] after projecting only shrinks each coordinate of the perturbation, so
        the result stays in the ball (up to float rounding; see :meth:`make_exact`).
        """
        delta = x_adv - x
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def contains(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-point check, exact in float64: finite, inside [0, 1] and inside the ball."""
        adv64, x64 = x_adv.detach().double(), x.detach().double()
        finite = torch.isfinite(adv64).flatten(1).all(dim=1)
        in_box = ((adv64 >= 0) & (adv64 <= 1)).flatten(1).all(dim=1)
        in_ball = self.norms(adv64 - x64) <= self.eps
        return finite & in_box & in_ball

    def make_exact(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """The float32 point of the ball nearest to ``x_adv``, exactly inside by :meth:`contains`.

        The projection is computed in float64 and rounded to float32 once; rounding can still
        leave a coordinate (L-inf) or a point (L2) a fraction of an ulp outside the ball, so those
        are stepped towards ``x`` by single ulps until the float64 check holds. The grader never
        counts a point that is outside the threat model by even one ulp.
        """
        x32 = x.detach().float()
        x64 = x32.double()
        adv64 = torch.nan_to_num(x_adv.detach().double(), nan=0.5, posinf=1.0, neginf=0.0)
        delta = adv64 - x64
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-300)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
        result = (x64 + delta).clamp(0.0, 1.0).float()
        for _ in range(64):
            if self.norm is Norm.LINF:
                over = (result.double() - x64).abs() > self.eps
                if not bool(over.any()):
                    return result
                result = torch.where(over, torch.nextafter(result, x32), result)
            else:
                outside = ~self.contains(result, x32)
                if not bool(outside.any()):
                    return result
                shrunk = (x64 + (result.double() - x64) * (1.0 - 1e-6)).float()
                result = torch.where(outside.view(-1, *([1] * (x.dim() - 1))), shrunk, result)
        inside = self.contains(result, x32)  # not reached for finite inputs
        return torch.where(inside.view(-1, *([1] * (x.dim() - 1))), result, x32)

    def random_start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A uniformly random point of the ball around each image (L2: uniform direction and a
        radius drawn so the point is uniform in volume), inside the box."""
        if self.norm is Norm.LINF:
            noise = uniform(x.shape, generator, x.device) * 2 - 1
            return self.project(x + self.eps * noise, x)
        direction = normal(x.shape, generator, x.device)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        dims = x[0].numel()
        radius = uniform((x.shape[0],), generator, x.device) ** (1.0 / dims)
        return self.project(x + self.eps * radius.view(-1, 1, 1, 1) * direction, x)


# --- Random numbers: drawn on the CPU from a seeded generator, so CPU and GPU runs agree. -----


def uniform(
    shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device
) -> Tensor:
    """U[0, 1) samples of ``shape`` from ``generator`` (a CPU generator), moved to ``device``."""
    return torch.rand(tuple(shape), generator=generator).to(device)


def normal(
    shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device
) -> Tensor:
    """N(0, 1) samples of ``shape`` from ``generator`` (a CPU generator), moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator).to(device)


def randint(
    low: int, high: int, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> Tensor:
    """Integers in [low, high) of ``shape`` from ``generator`` (a CPU generator), on ``device``."""
    return torch.randint(low, high, shape, generator=generator).to(device)


# --- Losses (one value per point; attacks maximize them) ---------------------------------------


def cross_entropy(y: Tensor) -> LossFn:
    """Untargeted cross-entropy loss towards leaving class ``y``."""
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def dlr(y: Tensor) -> LossFn:
    """Untargeted Difference of Logits Ratio (Croce & Hein 2020): scale-invariant margin loss
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with ``pi`` the logits sorted descending."""

    def loss(logits: Tensor) -> Tensor:
        ranked = logits.sort(dim=1, descending=True).values
        true = logits.gather(1, y[:, None]).squeeze(1)
        top_is_true = logits.argmax(dim=1) == y
        best_other = torch.where(top_is_true, ranked[:, 1], ranked[:, 0])
        return -(true - best_other) / (ranked[:, 0] - ranked[:, 2] + _DLR_EPS)

    return loss


def targeted_dlr(y: Tensor, target: Tensor) -> LossFn:
    """Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` towards class ``target``."""

    def loss(logits: Tensor) -> Tensor:
        ranked = logits.sort(dim=1, descending=True).values
        true = logits.gather(1, y[:, None]).squeeze(1)
        wanted = logits.gather(1, target[:, None]).squeeze(1)
        scale = ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + _DLR_EPS
        return -(true - wanted) / scale

    return loss


def margin(y: Tensor) -> LossFn:
    """``max_{i != y} z_i - z_y``: positive exactly when the point is misclassified."""

    def loss(logits: Tensor) -> Tensor:
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        return others.amax(dim=1) - true

    return loss


# --- The model under attack --------------------------------------------------------------------


@dataclass
class TargetModel:
    """An eval-mode model as attacks see it: fp32 logits, input gradients, and a cost count.

    With ``bf16`` the forward pass of attack steps runs under bf16 autocast (on the input's
    device: CUDA, or a CPU with native bf16) while the logits are cast back to fp32 before any
    loss; :meth:`verify_logits` is always plain fp32.
    ``eot_samples`` > 1 averages gradients over that many forward passes (Expectation over
    Transformation) for randomized defenses. ``forwards`` and ``backwards`` count images.
    """

    module: nn.Module
    bf16: bool = False
    eot_samples: int = 1
    forwards: int = field(default=0, init=False)
    backwards: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.eot_samples < 1:
            raise ValueError(f"eot_samples must be >= 1, got {self.eot_samples}")

    def _forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = self.module(x)
        else:
            out = self.module(x)
        self.forwards += x.shape[0]
        return out.float()

    def logits(self, x: Tensor) -> Tensor:
        """Logits without gradients (attack-step precision)."""
        with torch.no_grad():
            return self._forward(x)

    def verify_logits(self, x: Tensor) -> Tensor:
        """A fresh fp32 forward pass, never autocast: what a broken point is judged by."""
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = self.module(x.float()).float()
        self.forwards += x.shape[0]
        return out

    def value_and_grad(self, x: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor, Tensor]:
        """Per-point loss, its gradient with respect to ``x``, and the logits.

        With EOT the three are averages over ``eot_samples`` passes. Non-finite gradients are
        returned as they are: callers decide (the masking checks report them).
        """
        total_loss = torch.zeros(x.shape[0], device=x.device)
        total_grad = torch.zeros_like(x)
        total_logits: Tensor | None = None
        for _ in range(self.eot_samples):
            x_var = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self._forward(x_var)
                loss = loss_fn(logits)
                (grad,) = torch.autograd.grad(loss.sum(), x_var)
            self.backwards += x.shape[0]
            total_loss += loss.detach()
            total_grad += grad.detach()
            total_logits = (
                logits.detach() if total_logits is None else total_logits + logits.detach()
            )
        assert total_logits is not None  # eot_samples >= 1
        n = float(self.eot_samples)
        return total_loss / n, total_grad / n, total_logits / n


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own mode back, even after an error
    (a shared eval-mode model wrapped in a new module is not switched to train mode)."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


class Attack(ABC):
    """Base of every attack: ``attack(model, x, y, ball, generator=g)`` returns adversarial
    inputs for ``x``.

    ``__call__`` puts the model in eval mode (and restores its mode afterwards), checks the
    inputs, and projects the result exactly into the ball, so every attack's output is feasible
    by construction; subclasses implement :meth:`perturb`. Points an attack cannot break come
    back as the best candidate it found (or the clean point). All randomness comes from
    ``generator``, a seeded CPU ``torch.Generator``.
    """

    name: ClassVar[AttackName]

    def __call__(
        self,
        model: nn.Module | TargetModel,
        x: Tensor,
        y: Tensor,
        ball: Ball,
        *,
        generator: torch.Generator,
    ) -> Tensor:
        target = model if isinstance(model, TargetModel) else TargetModel(model)
        if x.dim() != 4 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x must be N x C x H x W with one label each, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return x.clone()
        with eval_mode(target.module):
            x_adv = self.perturb(target, x.detach().float(), y, ball, generator)
        return ball.make_exact(x_adv, x.float())

    @abstractmethod
    def perturb(
        self, model: TargetModel, x: Tensor, y: Tensor, ball: Ball, generator: torch.Generator
    ) -> Tensor:
        """Adversarial candidates for ``x`` (same shape, in the ball and [0, 1])."""

    def describe(self) -> dict[str, object]:
        """The attack's name and parameters, stored with every result."""
        params = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"name": self.name.value, **params}


def predict_logits(model: TargetModel, x: Tensor, batch_size: int) -> Tensor:
    """fp32 logits of ``x`` (on the model's device) in batches; verification precision."""
    parts = [model.verify_logits(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, 10, device=x.device)


def misclassified(logits: Tensor, y: Tensor) -> Tensor:
    """Per-point: the predicted class is not ``y``."""
    return logits.argmax(dim=1) != y


def top_targets(logits: Tensor, n_targets: int) -> Tensor:
    """N x n_targets target classes: the 2nd, 3rd, ... highest logits of each point (AutoAttack's
    choice for targeted attacks on correctly classified points)."""
    if not 1 <= n_targets < logits.shape[1]:
        raise ValueError(f"n_targets must be in [1, {logits.shape[1] - 1}], got {n_targets}")
    return logits.argsort(dim=1, descending=True)[:, 1 : n_targets + 1]
