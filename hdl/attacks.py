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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from hdl.errors import ConfigError
from hdl.norms import ATTACK_NORMS, parse_norm

TASKS = ("classification", "regression")
SQUARE_QUERIES = (
    1000  # the test loop's cheap gradient-free check; hdl-eval uses EVAL_SQUARE_QUERIES
)
EVAL_SQUARE_QUERIES = 5000


@dataclass(frozen=True)
class AttackSpec:
    """One attack: the norms and tasks it supports, whether torchattacks reseeds the global RNG
    inside it (we fork the RNG around those), whether adversarial training may use it
    (``loss.robust.method``), and its torchattacks factory (unit-box units, see :func:`_build`)."""

    norms: tuple[str, ...]
    tasks: tuple[str, ...]
    reseeds: bool
    trains: bool
    factory: Callable[..., Any]


def _pgd(g, eps, norm, steps, step_size, random_start, **_):
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    cls = torchattacks().PGD if norm == "inf" else torchattacks().PGDL2
    return cls(g, eps=eps, alpha=alpha, steps=steps, random_start=random_start)


def _fgsm(g, eps, **_):
    return torchattacks().FGSM(g, eps=eps)


def _fgsm_rs(g, eps, step_size, **_):
    return torchattacks().FFGSM(g, eps=eps, alpha=step_size if step_size else 1.25 * eps)


def _apgd(g, eps, norm, steps, seed, **_):
    return torchattacks().APGD(
        g, norm=_ta_norm(norm), eps=eps, steps=steps, n_restarts=1, seed=seed
    )


def _square(g, eps, norm, seed, queries, **_):
    return torchattacks().Square(g, norm=_ta_norm(norm), eps=eps, n_queries=queries, seed=seed)


def _autoattack(**_):  # run component by component in _torchattacks_perturb
    raise AssertionError("autoattack is composed of _AUTOATTACK's components")


_BOTH, _CLS = ("classification", "regression"), ("classification",)
# the attack registry: adding an attack is one entry here (and, for a new torchattacks class,
# its factory above); config validation, adversarial training, hdl-eval and hdl-compare read it
ATTACKS: dict[str, AttackSpec] = {
    "pgd": AttackSpec(ATTACK_NORMS, _BOTH, reseeds=False, trains=True, factory=_pgd),
    "fgsm": AttackSpec(("inf",), _BOTH, reseeds=False, trains=True, factory=_fgsm),
    "fgsm_rs": AttackSpec(("inf",), _BOTH, reseeds=False, trains=True, factory=_fgsm_rs),
    "apgd": AttackSpec(ATTACK_NORMS, _CLS, reseeds=True, trains=True, factory=_apgd),
    "autoattack": AttackSpec(ATTACK_NORMS, _CLS, reseeds=True, trains=False, factory=_autoattack),
    "square": AttackSpec(ATTACK_NORMS, _CLS, reseeds=True, trains=False, factory=_square),
}
ADVERSARIAL_METHODS = tuple(name for name, spec in ATTACKS.items() if spec.trains)
# APGD-T's and APGD-DLR's loss reads the 3rd/4th largest logit: AutoAttack needs >= 4 classes
_AUTOATTACK_MIN_CLASSES = 4

LossFn = Callable[[Tensor, Tensor], Tensor]


# --- argument checking ------------------------------------------------------------------
def torchattacks():
    """The torchattacks package, imported on first use (it is slow to import, and config
    validation reads the registry above before anything heavy is loaded)."""
    import torchattacks as ta

    return ta


def _ta_norm(norm: str) -> str:
    return "Linf" if norm == "inf" else "L2"


def parse_attack_norm(norm: str | float | int, key: str = "attack norm") -> str:
    """Canonical attack norm, "inf" or "2" (the shared vocabulary of :mod:`hdl.norms`)."""
    return parse_norm(norm, key, ATTACK_NORMS)


def _check(
    attack: str, norm: str | float, eps: float, steps: int, task: str
) -> tuple[str, str, float]:
    if attack not in ATTACKS:
        raise ConfigError(f"attack must be one of {list(ATTACKS)}, got {attack!r}")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    p = parse_attack_norm(norm)
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ConfigError(f"attack eps must be a number, got {eps!r}") from None
    if not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"attack eps must be finite and >= 0, got {eps!r}")
    if int(steps) < 1:
        raise ConfigError(f"attack steps must be >= 1, got {steps!r}")
    spec = ATTACKS[attack]
    if task not in spec.tasks:
        regression = [n for n, s in ATTACKS.items() if task in s.tasks]
        raise ConfigError(f"attack {attack!r} is classification-only; {task} supports {regression}")
    if p not in spec.norms:
        other = [n for n, s in ATTACKS.items() if p in s.norms]
        raise ConfigError(
            f"attack {attack!r} supports norms {list(spec.norms)}; for {p} use {other}"
        )
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
    p = parse_attack_norm(norm)
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
    queries: int,
) -> Any:
    """A fresh torchattacks attack (it fixes its device at construction), in unit-box units."""
    ta, p = torchattacks(), _ta_norm(norm)
    if name == "apgd-ce":
        return ta.APGD(g, norm=p, eps=eps, seed=seed, loss="ce", n_restarts=1)
    if name == "apgd-t":
        return ta.APGDT(g, norm=p, eps=eps, seed=seed, n_classes=n_classes, n_restarts=1)
    if name == "fab-t":
        return ta.FAB(
            g, norm=p, eps=eps, seed=seed, multi_targeted=True, n_classes=n_classes, n_restarts=1
        )
    if name == "square-aa":
        return ta.Square(g, norm=p, eps=eps, seed=seed, n_queries=EVAL_SQUARE_QUERIES, n_restarts=1)
    return ATTACKS[name].factory(
        g=g,
        eps=eps,
        norm=norm,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        seed=seed,
        queries=queries,
    )


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
    queries: int,
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
        atk = _build(
            name, g, eps / scale, norm, steps, u_step, random_start, min_classes, seed, queries
        )
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
def _domain(x: Tensor, input_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """The attack's box: the declared input range, widened to hold every clean input of the
    batch (a test point outside the training rows' range must stay a point of its own ball;
    clamping it into the range could move it further than eps)."""
    if input_range is None:
        return None
    return min(input_range[0], float(x.min())), max(input_range[1], float(x.max()))


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
    queries: int = SQUARE_QUERIES,
) -> Tensor:
    """Adversarial inputs: detached, same shape/device/dtype as x, ||x_adv - x||_p <= eps per
    example and inside ``input_range`` when given (None: unbounded, nothing is clamped; a range
    that does not hold a clean input is widened to hold it).

    Classification: torchattacks PGD/PGDL2, FGSM, FFGSM (``fgsm_rs``), APGD-CE, AutoAttack
    (standard) or Square (``queries`` queries). Regression: our PGD on the squared
    error (``fgsm``: one eps sign step; ``fgsm_rs``: random start + one 1.25*eps step).
    ``seed`` makes the random start reproducible without touching the global RNG.

    These are the attack's last iterates: an iterate can be classified correctly where the clean
    input is not. Robust metrics must combine them with the clean ones (:func:`worst_case`).
    """
    attack, p, eps = _check(attack, norm, eps, steps, task)
    if int(queries) < 1:
        raise ConfigError(f"attack queries must be >= 1, got {queries!r}")
    rng = _check_range(input_range)
    if eps == 0:
        return x.detach().clone()
    rng = _domain(x, rng)
    steps = int(steps)
    device = _model_device(model, x.device)
    # the weights are fixed during an attack: a masked weight (w * m) is computed once, not at
    # every one of the attack's forwards (Square: one per query)
    with attack_mode(model), parametrize.cached():
        xd = x.detach().to(device).clone()
        yd = y.detach().to(device).clone()
        with _rng(seed, device, fork=ATTACKS[attack].reseeds) as s:
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
                    queries=int(queries),
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


def per_example_outcome(out: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor | None]:
    """Per-example loss (CE, or mean squared error over outputs) and correctness (None for
    regression)."""
    y = y.to(out.device)
    if task == "classification":
        logits = class_logits(out)
        return cross_entropy_loss(logits, y), logits.argmax(dim=1) == y.long()
    b = out.shape[0]
    return squared_error_loss(out, y) / out.reshape(b, -1).shape[1], None


def worst_case(
    clean: tuple[Tensor, Tensor | None], attacked: tuple[Tensor, Tensor | None]
) -> tuple[Tensor, Tensor | None]:
    """Per-example outcome under attack, counted the AutoAttack / RobustBench way.

    The clean input is a point of its own eps-ball, so the worst case found is the worse of the
    clean and the attacked input: an example counts as robust only when it is correct on both,
    and its loss (squared error) is the larger of the two. Robust accuracy therefore never
    exceeds natural accuracy, even when an attack's last iterate happens to fix a mistake."""
    loss = torch.maximum(clean[0], attacked[0])
    correct = None if clean[1] is None else clean[1] & attacked[1]
    return loss, correct


def summarise(loss: Tensor, correct: Tensor | None, task: str) -> dict[str, float]:
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
    loss, correct = per_example_outcome(predict(model, x, batch_size), y, task)
    return summarise(loss, correct, task)


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
    queries: int = SQUARE_QUERIES,
) -> dict[float, dict[str, float]]:
    """Robust metrics at every eps (ascending; eps = 0 gives natural metrics).

    An example counts as robust at eps only when it is correct on its clean input **and** on
    the attacked one (:func:`worst_case`), so accuracy at eps > 0 is at most natural accuracy.
    With ``cumulative`` (default) it must also have withstood every smaller eps in the list, and
    its loss is the worst one found so far: an adversarial example within a smaller ball lies in
    every larger ball, so this is still a valid (and tighter) estimate, and accuracy is
    non-increasing in eps by construction. ``cumulative=False`` keeps each radius's own attack
    (what ``hdl-eval``'s monotonicity check needs to catch a weak attack).
    """
    _check(attack, norm, max(eps_list, default=0.0), steps, task)
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    device = _model_device(model, x.device)
    y = y.to(device)
    clean = per_example_outcome(predict(model, x, batch_size), y, task)
    results: dict[float, dict[str, float]] = {}
    worst = clean
    for eps in sorted({float(e) for e in eps_list}):
        if eps == 0:
            results[eps] = summarise(*clean, task)
            continue
        outs = []
        for i, start in enumerate(range(0, len(x), batch_size)):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size]
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
                queries=queries,
            )
            outs.append(predict(model, xa, batch_size))
        attacked = per_example_outcome(torch.cat(outs), y, task)
        found = worst_case(worst if cumulative else clean, attacked)
        if cumulative:
            worst = found
        results[eps] = summarise(*found, task)
    return results
