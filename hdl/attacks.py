"""Adversarial attacks for evaluation and adversarial training.

Classification is attacked with torchattacks (an independent implementation, so our robust
training is never judged by our own attack code). torchattacks assumes images in [0, 1]: it
clamps every iterate to [0, 1] and most attacks assume 4-D tensors. We therefore hand it the
model composed with an exact affine map of the input domain onto the unit box,

    g(u) = model(lo + scale * u),   u = (x - lo) / scale,   eps_u = eps / scale,

with one scalar ``scale`` for all features, so l_inf and l_2 balls map onto balls exactly.
With ``input_range=(lo, hi)`` the clamp to [0, 1] is exactly the clamp to the domain; with
``input_range=None`` (standardised tabular data, sequences) ``lo``/``scale`` are chosen per call
so that every example's whole eps-ball lies strictly inside the box and the clamp never binds.
Inputs that are not 4-D are laid out as (B, N, 1, 1) (Square: a zero-padded square image);
AutoAttack runs torchattacks' own components in its order, each in a layout it supports.

Regression has no torchattacks counterpart (it only knows cross-entropy), so it uses our own
projected gradient attack on the squared error, :func:`projected_gradient_attack`, which the
tests check against torchattacks' PGD on images by running it with the cross-entropy loss.

Every attack runs with the model in eval mode (no dropout, no BatchNorm statistics updates),
with its parameters frozen (no ``.grad`` is ever written, even by FAB's ``backward()``), with
cuDNN off for RNNs (cuDNN RNNs cannot backpropagate in eval mode), under ``enable_grad`` and
outside inference mode; all of it is restored afterwards, as is the global RNG state whenever
an attack reseeds it (torchattacks' APGD, FAB and Square call ``torch.manual_seed``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from hdl.errors import ConfigError

ATTACKS = ("pgd", "fgsm", "fgsm_rs", "apgd", "autoattack", "square")
REGRESSION_ATTACKS = ("pgd", "fgsm", "fgsm_rs")  # ours; torchattacks is cross-entropy only
LINF_ONLY = ("fgsm", "fgsm_rs")
TASKS = ("classification", "regression")
SQUARE_MIN_QUERIES = 1000
_NORMS = {
    "inf": "inf",
    "linf": "inf",
    "l_inf": "inf",
    "infinity": "inf",
    "2": "2",
    "l2": "2",
    "l_2": "2",
}
# torchattacks reseeds the global RNG inside these; we fork it so training randomness is intact
_RESEEDING = ("apgd", "autoattack", "square")
# APGD-T's and APGD-DLR's loss reads the 3rd/4th largest logit: AutoAttack needs >= 4 classes
_AUTOATTACK_MIN_CLASSES = 4

LossFn = Callable[[Tensor, Tensor], Tensor]


# --- argument checking ------------------------------------------------------------------
def parse_norm(norm: str | float | int) -> str:
    """Canonical norm name, "inf" or "2", from "inf"/"linf"/float("inf")/"2"/"l2"/2."""
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        if math.isinf(norm) and norm > 0:
            return "inf"
        if norm == 2:
            return "2"
    elif isinstance(norm, str) and norm.strip().lower() in _NORMS:
        return _NORMS[norm.strip().lower()]
    raise ConfigError(f"attack norm must be 'inf' or '2', got {norm!r}")


def _check(
    attack: str, norm: str | float, eps: float, steps: int, task: str
) -> tuple[str, str, float]:
    if attack not in ATTACKS:
        raise ConfigError(f"attack must be one of {list(ATTACKS)}, got {attack!r}")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    p = parse_norm(norm)
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ConfigError(f"attack eps must be a number, got {eps!r}") from None
    if not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"attack eps must be finite and >= 0, got {eps!r}")
    if int(steps) < 1:
        raise ConfigError(f"attack steps must be >= 1, got {steps!r}")
    if task == "regression" and attack not in REGRESSION_ATTACKS:
        raise ConfigError(
            f"attack {attack!r} is classification-only; regression supports {list(REGRESSION_ATTACKS)}"
        )
    if p == "2" and attack in LINF_ONLY:
        raise ConfigError(f"attack {attack!r} is l_inf only; use 'pgd' or 'apgd' for norm 2")
    return attack, p, eps


def _check_range(input_range: Sequence[float] | None) -> tuple[float, float] | None:
    if input_range is None:
        return None
    lo, hi = (float(v) for v in input_range)
    if not lo < hi:
        raise ConfigError(f"input_range must be (lo, hi) with lo < hi, got {input_range!r}")
    return lo, hi


# --- state hygiene ----------------------------------------------------------------------
@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters, cuDNN off for RNNs, gradients on; all restored on exit.

    Freezing the parameters means input gradients never write ``.grad`` on the model (FAB
    calls ``backward()``) and no weight gradients are computed at all. Training flags are
    restored per module, so a model with a deliberately frozen BatchNorm stays that way.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    cudnn = torch.backends.cudnn.enabled
    try:
        model.eval()
        for p, _ in params:
            p.requires_grad_(False)
        if has_rnn:  # torch.backends.cudnn.flags() would also reset benchmark/deterministic
            torch.backends.cudnn.enabled = False
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn
        for p, flag in params:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


@contextlib.contextmanager
def _rng(seed: int | None, device: torch.device, fork: bool) -> Iterator[int | None]:
    """Fork the global RNG when seeding (or when the attack reseeds it) and seed it."""
    if seed is None and not fork:
        yield None
        return
    if seed is None:  # drawn from the caller's RNG, so torch.manual_seed still governs it
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield seed


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


# --- outputs and losses -----------------------------------------------------------------
def class_logits(out: Tensor, min_classes: int = 2) -> Tensor:
    """(B, C) logits; a single logit z (binary) becomes [0, z], which has the same
    cross-entropy as BCE-with-logits. With fewer than ``min_classes`` columns, constant
    columns far below every logit are appended (no effect on predictions or cross-entropy)."""
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        z = out.reshape(-1, 1)
        out = torch.cat([torch.zeros_like(z), z], dim=1)
    if out.shape[1] < min_classes:
        low = out.detach().min(dim=1, keepdim=True).values - 1e3
        out = torch.cat([out, low.expand(-1, min_classes - out.shape[1])], dim=1)
    return out


def cross_entropy_loss(out: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (the loss of every torchattacks gradient attack)."""
    return F.cross_entropy(class_logits(out), y.long(), reduction="none")


def squared_error_loss(out: Tensor, y: Tensor) -> Tensor:
    """Per-example squared error, summed over output dimensions."""
    b = out.shape[0]
    return ((out.reshape(b, -1) - y.reshape(b, -1).to(out.dtype)) ** 2).sum(dim=1)


# --- projection -------------------------------------------------------------------------
def project(
    x_adv: Tensor, x: Tensor, eps: float, norm: str, input_range: tuple[float, float] | None
) -> Tensor:
    """Project x_adv onto {x' : ||x' - x||_p <= eps} and then into the input range.

    Clamping after the ball projection never leaves the ball when x is inside the range
    (each coordinate only moves towards x)."""
    b = x.shape[0]
    d = (x_adv - x).reshape(b, -1)
    if norm == "inf":
        d = d.clamp(-eps, eps)
    else:
        n = d.norm(dim=1, keepdim=True)
        d = d * torch.clamp(eps / (n + 1e-12), max=1.0)
    out = x + d.reshape(x.shape)
    if input_range is not None:
        out = out.clamp(*input_range)
    return out


# --- our own projected gradient attack ---------------------------------------------------
def projected_gradient_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str | float = "inf",
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    input_range: tuple[float, float] | None = None,
    loss_fn: LossFn = squared_error_loss,
) -> Tensor:
    """PGD maximising ``loss_fn(model(x'), y)`` (per example) over the eps-ball ∩ range.

    Sign steps for l_inf, l2-normalised steps for l_2, torchattacks' random starts and
    default step size 2.5 * eps / steps. Used for regression; with ``cross_entropy_loss``
    it is the same algorithm as torchattacks.PGD / PGDL2 (which the tests check)."""
    p = parse_norm(norm)
    rng = _check_range(input_range)
    alpha = float(step_size) if step_size is not None else 2.5 * eps / steps
    view = (-1,) + (1,) * (x.dim() - 1)
    with attack_mode(model):
        x = x.detach().clone()
        y = y.detach().clone()
        x_adv = x.clone()
        if random_start:
            if p == "inf":
                delta = torch.empty_like(x).uniform_(-eps, eps)
            else:
                delta = torch.randn_like(x)
                n = delta.flatten(1).norm(dim=1).view(view) + 1e-12
                delta = delta * torch.rand_like(n) / n * eps
            x_adv = project(x + delta, x, eps, p, rng)
        for _ in range(int(steps)):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y).sum()
            if not loss.requires_grad:  # output does not depend on the input
                break
            (g,) = torch.autograd.grad(loss, x_adv, allow_unused=True)
            if g is None:
                break
            if p == "inf":
                step = g.sign()
            else:
                step = g / (g.flatten(1).norm(dim=1).view(view) + 1e-12)
            x_adv = project(x_adv.detach() + alpha * step, x, eps, p, rng).detach()
    return x_adv.detach()


# --- torchattacks through the affine map -------------------------------------------------
class _UnitBoxModel(nn.Module):
    """g(u) = model(lo + scale * u) on torchattacks' layout of the batch (an nn.Module, since
    torchattacks reads its parameters for the device and toggles its training mode)."""

    def __init__(
        self,
        model: nn.Module,
        lo: float,
        scale: float,
        shape: tuple[int, ...],
        n_features: int,
        min_classes: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.lo, self.scale = lo, scale
        self.shape, self.n_features, self.min_classes = shape, n_features, min_classes

    def forward(self, u: Tensor) -> Tensor:
        b = u.shape[0]
        v = u.reshape(b, -1)[:, : self.n_features]
        out = self.model((self.lo + self.scale * v).reshape(b, *self.shape))
        return class_logits(out, self.min_classes)


def _unit_box(
    x: Tensor, eps: float, norm: str, input_range: tuple[float, float] | None
) -> tuple[float, float]:
    """(lo, scale) of the affine map. Unbounded: the box holds every eps-ball with a margin
    (for l_2 a coordinate also moves by at most eps), so torchattacks' clamp never binds."""
    if input_range is not None:
        lo, hi = input_range
        return lo, hi - lo
    x_min, x_max = float(x.min()), float(x.max())
    margin = 0.05 * (x_max - x_min + 2 * eps) + 1e-3 * max(1.0, abs(x_min), abs(x_max))
    lo = x_min - eps - margin
    return lo, (x_max + eps + margin) - lo


def _layout(x: Tensor, attack: str) -> tuple[tuple[int, ...], int]:
    """Per-example shape torchattacks sees, and how many zero pads it has at the end.

    Its attacks assume (B, C, H, W); Square also needs H == W (>= 5 for its l_2 init), so
    other inputs become one zero-padded square channel for it (g ignores the pads, but for
    l_2 they take part of Square's budget: it is weaker on low-dimensional inputs)."""
    n = x[0].numel()
    if attack.startswith("square"):
        if x.dim() == 4 and x.shape[2] == x.shape[3] >= 5:
            return tuple(x.shape[1:]), 0
        side = max(math.ceil(math.sqrt(n)), 5)
        return (1, side, side), side * side - n
    if x.dim() == 4:
        return tuple(x.shape[1:]), 0
    return (n, 1, 1), 0


# AutoAttack "standard" (torchattacks.AutoAttack's list and settings), run component by
# component so that each gets a layout it supports (Square's differs from the others')
_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square-aa")


def _build(
    name: str,
    g: nn.Module,
    eps: float,
    norm: str,
    steps: int,
    step_size: float | None,
    random_start: bool,
    n_classes: int,
    seed: int | None,
) -> torchattacks.attack.Attack:
    """A fresh torchattacks attack (it fixes its device at construction), in unit-box units."""
    p = "Linf" if norm == "inf" else "L2"
    if name == "pgd":
        alpha = step_size if step_size is not None else 2.5 * eps / steps
        cls = torchattacks.PGD if norm == "inf" else torchattacks.PGDL2
        return cls(g, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    if name == "fgsm":
        return torchattacks.FGSM(g, eps=eps)
    if name == "fgsm_rs":
        return torchattacks.FFGSM(g, eps=eps, alpha=step_size if step_size else 1.25 * eps)
    if name == "apgd":
        return torchattacks.APGD(g, norm=p, eps=eps, steps=steps, n_restarts=1, seed=seed)
    if name == "square":
        n_queries = max(SQUARE_MIN_QUERIES, steps)
        return torchattacks.Square(g, norm=p, eps=eps, n_queries=n_queries, seed=seed)
    if name == "apgd-ce":
        return torchattacks.APGD(g, norm=p, eps=eps, seed=seed, loss="ce", n_restarts=1)
    if name == "apgd-t":
        return torchattacks.APGDT(g, norm=p, eps=eps, seed=seed, n_classes=n_classes, n_restarts=1)
    if name == "fab-t":
        return torchattacks.FAB(
            g, norm=p, eps=eps, seed=seed, multi_targeted=True, n_classes=n_classes, n_restarts=1
        )
    if name == "square-aa":
        return torchattacks.Square(g, norm=p, eps=eps, seed=seed, n_queries=5000, n_restarts=1)
    raise AssertionError(name)


def _torchattacks_perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    attack: str,
    norm: str,
    steps: int,
    step_size: float | None,
    random_start: bool,
    input_range: tuple[float, float] | None,
    num_classes: int | None,
    seed: int | None,
) -> Tensor:
    lo, scale = _unit_box(x, eps, norm, input_range)
    n = x[0].numel()
    min_classes = 2
    if attack == "autoattack":
        if num_classes is None:
            with torch.no_grad():
                num_classes = class_logits(model(x[:1])).shape[1]
        min_classes = max(int(num_classes), _AUTOATTACK_MIN_CLASSES)
    # eval: torchattacks calls .train() after an attack on a model that was in training mode
    g = _UnitBoxModel(model, lo, scale, tuple(x.shape[1:]), n, min_classes).eval()

    def run(name: str, xs: Tensor, ys: Tensor) -> Tensor:
        b = xs.shape[0]
        shape, pad = _layout(xs, name)
        u = ((xs - lo) / scale).reshape(b, -1)
        if pad:
            u = torch.cat([u, u.new_zeros(b, pad)], dim=1)
        u_step = None if step_size is None else step_size / scale
        atk = _build(name, g, eps / scale, norm, steps, u_step, random_start, min_classes, seed)
        atk.set_device(xs.device)
        u_adv = atk(u.reshape(b, *shape), ys.long()).reshape(b, -1)[:, :n]
        return lo + scale * u_adv.reshape(xs.shape).to(xs.dtype)

    if attack != "autoattack":
        return run(attack, x, y)
    # torchattacks.MultiAttack's rule: each attack gets the examples none before it fooled
    x_adv = x.clone()
    left = torch.arange(len(x), device=x.device)
    for name in _AUTOATTACK:
        xa = run(name, x[left], y[left])
        with torch.no_grad():
            fooled = class_logits(model(xa)).argmax(dim=1) != y[left].long()
        x_adv[left[fooled]] = xa[fooled]
        left = left[~fooled]
        if len(left) == 0:
            break
    return x_adv


# --- public entry points ----------------------------------------------------------------
def perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    attack: str = "pgd",
    norm: str | float = "inf",
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    input_range: tuple[float, float] | None = None,
    task: str = "classification",
    num_classes: int | None = None,
    seed: int | None = None,
) -> Tensor:
    """Adversarial inputs: detached, same shape/device/dtype as x, ||x_adv - x||_p <= eps per
    example and inside ``input_range`` when given (None: unbounded, nothing is clamped).

    Classification: torchattacks PGD/PGDL2, FGSM, FFGSM (``fgsm_rs``), APGD-CE, AutoAttack
    (standard) or Square (``max(1000, steps)`` queries). Regression: our PGD on the squared
    error (``fgsm``: one eps sign step; ``fgsm_rs``: random start + one 1.25*eps step).
    ``seed`` makes the random start reproducible without touching the global RNG.
    """
    attack, p, eps = _check(attack, norm, eps, steps, task)
    rng = _check_range(input_range)
    if eps == 0:
        return x.detach().clone()
    steps = int(steps)
    device = _model_device(model, x.device)
    with attack_mode(model):
        xd = x.detach().to(device).clone()
        yd = y.detach().to(device).clone()
        with _rng(seed, device, fork=attack in _RESEEDING) as s:
            if task == "regression":
                n, alpha, rs = steps, step_size, random_start
                if attack == "fgsm":
                    n, alpha, rs = 1, eps, False
                elif attack == "fgsm_rs":
                    n, alpha, rs = 1, step_size or 1.25 * eps, True
                x_adv = projected_gradient_attack(
                    model,
                    xd,
                    yd,
                    eps=eps,
                    norm=p,
                    steps=n,
                    step_size=alpha,
                    random_start=rs,
                    input_range=rng,
                    loss_fn=squared_error_loss,
                )
            else:
                x_adv = _torchattacks_perturb(
                    model,
                    xd,
                    yd,
                    eps=eps,
                    attack=attack,
                    norm=p,
                    steps=steps,
                    step_size=step_size,
                    random_start=random_start,
                    input_range=rng,
                    num_classes=num_classes,
                    seed=s,
                )
        # exact guarantee despite the round-off of the affine map
        x_adv = project(x_adv.detach(), xd, eps, p, rng)
    return x_adv.to(device=x.device, dtype=x.dtype).detach()


def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Model outputs in eval mode without gradients, in mini-batches on the model's device
    (the model's training flags are restored)."""
    device = _model_device(model, x.device)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            outs = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    finally:
        for m, flag in modes:
            m.training = flag
    return torch.cat(outs)


def _per_example(out: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor | None]:
    """Per-example loss (CE, or mean squared error over outputs) and correctness."""
    y = y.to(out.device)
    if task == "classification":
        logits = class_logits(out)
        return cross_entropy_loss(logits, y), logits.argmax(dim=1) == y.long()
    b = out.shape[0]
    return squared_error_loss(out, y) / out.reshape(b, -1).shape[1], None


def _summary(loss: Tensor, correct: Tensor | None, task: str) -> dict[str, float]:
    if task == "classification":
        return {"accuracy": correct.float().mean().item(), "loss": loss.mean().item()}
    mse = loss.mean().item()
    return {"rmse": math.sqrt(mse), "mse": mse}


def natural_metrics(
    model: nn.Module, x: Tensor, y: Tensor, *, task: str = "classification", batch_size: int = 512
) -> dict[str, float]:
    """{"accuracy", "loss"} (classification) or {"rmse", "mse"} (regression) on clean inputs."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    loss, correct = _per_example(predict(model, x, batch_size), y, task)
    return _summary(loss, correct, task)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Natural classification accuracy."""
    return natural_metrics(model, x, y, batch_size=batch_size)["accuracy"]


def evaluate_under_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps_list: Sequence[float],
    attack: str = "pgd",
    norm: str | float = "inf",
    steps: int = 40,
    input_range: tuple[float, float] | None = None,
    task: str = "classification",
    num_classes: int | None = None,
    batch_size: int = 512,
    seed: int = 0,
    cumulative: bool = True,
) -> dict[float, dict[str, float]]:
    """Metrics under attack at every eps (ascending; eps = 0 gives natural metrics).

    With ``cumulative`` (default) an example counts as robust at eps only if it also withstood
    every smaller eps in the list, and its loss is the worst one found so far: an adversarial
    example within a smaller ball lies in every larger ball, so this is still a valid (and
    tighter) estimate, and accuracy is non-increasing in eps by construction.
    """
    _check(attack, norm, max(eps_list, default=0.0), steps, task)
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    device = _model_device(model, x.device)
    results: dict[float, dict[str, float]] = {}
    worst: Tensor | None = None
    robust: Tensor | None = None
    for eps in sorted({float(e) for e in eps_list}):
        losses, corrects = [], []
        for i, start in enumerate(range(0, len(x), batch_size)):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            xa = perturb(
                model,
                xb,
                yb,
                eps=eps,
                attack=attack,
                norm=norm,
                steps=steps,
                input_range=input_range,
                task=task,
                num_classes=num_classes,
                seed=seed + i,
            )
            loss, correct = _per_example(predict(model, xa, batch_size), yb, task)
            losses.append(loss)
            corrects.append(correct)
        loss = torch.cat(losses)
        correct = torch.cat(corrects) if task == "classification" else None
        if cumulative and worst is not None:
            loss = torch.maximum(loss, worst)
            if correct is not None:
                correct = correct & robust
        worst, robust = loss, correct
        results[eps] = _summary(loss, correct, task)
    return results
