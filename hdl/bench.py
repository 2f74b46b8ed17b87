"""``hdl-bench``: what robust (and holistic) training costs per optimizer step.

For a model preset (``conf/bench.yaml``; default an MLP 784-128-128-10 on random inputs, batch
256) it times one full optimizer step (forward, loss, backward, Adam) of every loss variant as
the median of repeated runs in one process, interleaved across variants after a warm-up, so
that a shared or throttled CPU slows every variant alike. It then measures how the robust term
grows with the number of classes and the input size, compares implementations of the exact
term (:mod:`hdl.bench_exact`), and measures Lightning's overhead over a plain loop
(:mod:`hdl.bench_overhead`). Everything is printed and written as JSON.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from hdl.bench_memory import measure_peak
from hdl.build import config_dir, load_preset
from hdl.losses import HolisticLoss, robust_cross_entropy
from hdl.norms import norm_value

Step = Callable[[], None]
Clock = Callable[[], float]


# --- building blocks ------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(preset: Any, classes: int) -> nn.Module:
    """conf/model/<preset.config>.yaml with the preset's overrides."""
    from hydra.utils import instantiate

    node = OmegaConf.create(load_preset("model", preset.config))
    node = OmegaConf.merge(node, preset.get("overrides") or {})
    node = OmegaConf.to_container(node, resolve=True)
    node.pop("name", None)
    return instantiate(node, input_shape=list(preset.input_shape), num_outputs=int(classes))


def build_loss(spec: Any, input_range: Any = None) -> HolisticLoss:
    """conf/loss/<spec.preset>.yaml with the spec's other keys merged over it."""
    spec = OmegaConf.create(OmegaConf.to_container(spec, resolve=True))
    node = OmegaConf.create(load_preset("loss", spec.pop("preset")))
    node = OmegaConf.to_container(OmegaConf.merge(node, spec), resolve=True)
    rng = tuple(input_range) if input_range is not None else None
    return HolisticLoss(task="classification", input_range=rng, **node)


def random_batch(
    shape: list[int], batch: int, classes: int, input_range: Any, seed: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if input_range is None:
        x = torch.randn(batch, *shape, generator=g)
    else:
        lo, hi = (float(v) for v in input_range)
        x = lo + (hi - lo) * torch.rand(batch, *shape, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def make_step(model: nn.Module, loss: HolisticLoss, x: Tensor, y: Tensor) -> Step:
    """One full optimizer step: zero_grad, composite loss, backward, Adam."""
    if loss.sparse.enabled:
        from hdl.sparsity import add_masks

        add_masks(model, init=float(loss.sparse.mask_init))
    loss.to(x.device)
    optimizer = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        total, _ = loss(model, x, y)
        total.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[str, Step], warmup: int, repeats: int, device: torch.device, clock: Clock
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds (by ``clock``) of every repeat of every step, the steps taking turns within
    each repeat. A step that raises during warm-up is dropped and its error returned instead."""
    errors: dict[str, str] = {}
    for name, step in list(steps.items()):
        try:
            for _ in range(max(int(warmup), 1)):
                step()
        except Exception as err:  # noqa: BLE001 - reported in the table, not fatal
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    live = {k: v for k, v in steps.items() if k not in errors}
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(int(repeats)):
        for name, step in live.items():
            _sync(device)
            start = clock()
            step()
            _sync(device)
            times[name].append(clock() - start)
    return times, errors


def pick_clock(device: torch.device, threads: int) -> tuple[Clock, str]:
    """CPU time of the process on a one-thread CPU run: unlike wall time it does not count the
    time other jobs hold the core, so ratios stay meaningful on a shared machine. Wall time
    otherwise (a GPU, or several threads whose spin-waits would count as CPU time)."""
    if device.type == "cpu" and threads == 1:
        return time.process_time, "process CPU time"
    return time.perf_counter, "wall time"


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


# --- the sections ---------------------------------------------------------------------------
def topk_error(model: nn.Module, x: Tensor, y: Tensor, robust: Any) -> float:
    """Mean relative error of the top-k robust loss against the exact one on the same batch."""
    eps, p = float(robust.eps), norm_value(robust.norm, "loss.robust.norm")
    exact = robust_cross_entropy(model, x, y, eps, p).detach()
    approx = robust_cross_entropy(model, x, y, eps, p, top_k=int(robust.top_k)).detach()
    return float(((exact - approx).abs() / exact.abs().clamp_min(1e-12)).mean())


def bench_variants(cfg: DictConfig, device: torch.device, clock: Clock) -> list[dict[str, Any]]:
    """One row per loss variant: ms per step, ratio to plain, peak memory, top-k error."""
    preset = cfg.presets[cfg.preset]
    classes = int(cfg.classes)
    torch.manual_seed(int(cfg.seed))
    base = build_model(preset, classes).to(device)
    x, y = random_batch(
        list(preset.input_shape), int(cfg.batch_size), classes, preset.input_range, cfg.seed, device
    )
    steps, losses, models = {}, {}, {}
    for name, spec in cfg.variants.items():
        losses[name] = build_loss(spec, preset.input_range)
        models[name] = copy.deepcopy(base)
        steps[name] = make_step(models[name], losses[name], x, y)
    notes = {}
    for name, loss in losses.items():  # error against exact, on the untrained weights
        if loss.robust.enabled and loss.robust.method == "first_order" and loss.robust.top_k:
            notes[name] = topk_error(base, x, y, loss.robust)
    times, errors = time_interleaved(steps, cfg.warmup, cfg.repeats, device, clock)
    plain = _ms(times["plain"]) if "plain" in times else math.nan
    rows = []
    for name in steps:
        row: dict[str, Any] = {"variant": name}
        if name in errors:
            row["error"] = errors[name]
        else:
            row |= {"ms": _ms(times[name]), "ratio": _ms(times[name]) / plain}
            row |= measure_peak(steps[name], device)
        if name in notes:
            row["topk_rel_error"] = notes[name]
        rows.append(row)
    return rows


def bench_scaling(cfg: DictConfig, device: torch.device, clock: Clock) -> list[dict[str, Any]]:
    """Exact and top-k (l_inf) step cost vs plain CE for an MLP at each classes x input size."""
    s = cfg.scaling
    eps = float(load_preset("loss", "robust")["robust"]["eps"])
    rows = []
    for classes in s.classes:
        for size in s.input_sizes:
            preset = OmegaConf.create(
                {
                    "config": "mlp",
                    "input_shape": [int(size)],
                    "overrides": {"hidden": list(s.hidden)},
                }
            )
            torch.manual_seed(int(cfg.seed))
            base = build_model(preset, int(classes)).to(device)
            x, y = random_batch(
                [int(size)], int(cfg.batch_size), int(classes), None, cfg.seed, device
            )
            specs: dict[str, dict[str, Any]] = {"plain": {"eps": 0.0}, "exact": {"eps": eps}}
            for k in s.top_k:
                if int(k) < int(classes) - 1:  # k >= C - 1 is the exact term
                    specs[f"topk{int(k)}"] = {"eps": eps, "top_k": int(k)}
            steps = {
                name: make_step(copy.deepcopy(base), HolisticLoss(robust=spec), x, y)
                for name, spec in specs.items()
            }
            times, _ = time_interleaved(steps, cfg.warmup, s.repeats, device, clock)
            plain = _ms(times["plain"])
            row: dict[str, Any] = {"classes": int(classes), "input_size": int(size)}
            row["plain_ms"] = plain
            for name in specs:
                if name != "plain":
                    row[f"{name}_ms"] = _ms(times[name])
                    row[f"{name}_ratio"] = _ms(times[name]) / plain
            rows.append(row)
    return rows


def bench_exact_options(
    cfg: DictConfig, device: torch.device, clock: Clock
) -> list[dict[str, Any]]:
    """Each implementation of the exact term: agreement with the library and ms per step."""
    from hdl.bench_exact import OPTIONS

    preset = cfg.presets[cfg.preset]
    classes = int(cfg.classes)
    eps = float(load_preset("loss", "robust")["robust"]["eps"])
    p = norm_value(cfg.exact_options.norm, "exact_options.norm")
    torch.manual_seed(int(cfg.seed))
    base = build_model(preset, classes).to(device)
    x, y = random_batch(
        list(preset.input_shape), int(cfg.batch_size), classes, preset.input_range, cfg.seed, device
    )
    reference = robust_cross_entropy(base, x, y, eps, p).detach()
    steps, diffs, errors = {"plain": _option_step(None, base, x, y, eps, p)}, {}, {}
    for name in cfg.exact_options.options:
        fn = OPTIONS[name]
        model = copy.deepcopy(base)
        try:
            diffs[name] = float((fn(model, x, y, eps, p).detach() - reference).abs().max())
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            continue
        steps[name] = _option_step(fn, model, x, y, eps, p)
    times, step_errors = time_interleaved(steps, cfg.warmup, cfg.repeats, device, clock)
    errors |= step_errors
    plain = _ms(times["plain"])
    rows = []
    for name in cfg.exact_options.options:
        row: dict[str, Any] = {"option": name, "max_abs_diff": diffs.get(name, math.nan)}
        if name in errors:
            row["error"] = errors[name]
        else:
            row |= {"ms": _ms(times[name]), "ratio": _ms(times[name]) / plain}
        rows.append(row)
    return rows


def _option_step(fn: Any, model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Step:
    import torch.nn.functional as F

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) if fn is None else fn(model, x, y, eps, p).mean()
        loss.backward()
        optimizer.step()

    return step


# --- report ---------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".2f") -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else format(value, spec)
    return "-" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    cells += [[_fmt(r.get(k), f) for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _errors(rows: list[dict[str, Any]], key: str) -> str:
    return "".join(f"\n  {r[key]}: {r['error']}" for r in rows if "error" in r)


def report(result: dict[str, Any]) -> str:
    env = result["environment"]
    out = [
        f"hdl-bench: preset {result['preset']} ({result['model']}), batch {result['batch_size']}, "
        f"{result['classes']} classes, {env['device']} ({env['threads']} threads), torch "
        f"{env['torch']}; ms = median {result['clock']} of {result['repeats']} steps after "
        f"{result['warmup']} warm-up",
        "",
        format_table(
            result["variants"],
            [
                ("variant", "variant", ""),
                ("ms", "ms/step", ".2f"),
                ("ratio", "x plain", ".2f"),
                ("peak_mb", "peak MB", ".0f"),
                ("step_mb", "step MB", ".1f"),
                ("topk_rel_error", "top-k rel. err", ".4f"),
            ],
        )
        + _errors(result["variants"], "variant"),
    ]
    if result.get("scaling"):
        cols = [("classes", "C", ""), ("input_size", "input", ""), ("plain_ms", "plain ms", ".2f")]
        keys = sorted({k[:-6] for r in result["scaling"] for k in r if k.endswith("_ratio")})
        cols += [(f"{k}_ratio", f"{k} x", ".2f") for k in keys]
        out += ["", "scaling (MLP, l_inf, ratio to plain at the same C and input size):"]
        out += [format_table(result["scaling"], cols)]
    if result.get("exact_options"):
        out += ["", "exact robust term (l_inf), implementations (full step):"]
        cols = [
            ("option", "option", ""),
            ("ms", "ms/step", ".2f"),
            ("ratio", "x plain", ".2f"),
            ("max_abs_diff", "max |diff|", ".1e"),
        ]
        out += [
            format_table(result["exact_options"], cols) + _errors(result["exact_options"], "option")
        ]
    if result.get("overhead"):
        out += ["", "framework overhead: one epoch, Trainer.fit vs a plain loop (tabular MLP):"]
        cols = [
            ("batch_size", "batch", ""),
            ("steps_per_epoch", "steps", ""),
            ("plain_epoch_ms", "plain ms", ".1f"),
            ("fit_epoch_ms", "fit epoch ms", ".1f"),
            ("ratio", "x plain", ".2f"),
            ("fit_call_ms", "fit call ms", ".1f"),
            ("ratio_fit_call", "call x plain", ".2f"),
            ("fit_nolog_epoch_ms", "no-log epoch ms", ".1f"),
            ("ratio_nolog", "no-log x plain", ".2f"),
        ]
        out += [format_table(result["overhead"], cols)]
    if result.get("stacked"):
        out += ["", "stacked training: one step of N members (tabular MLP), separate vs stacked:"]
        cols = [
            ("variant", "variant", ""),
            ("members", "N", ""),
            ("separate_ms", "separate ms", ".1f"),
            ("stacked_ms", "stacked ms", ".1f"),
            ("speedup", "speed-up", ".2f"),
        ]
        out += [format_table(result["stacked"], cols)]
    return "\n".join(out)


# --- entry points ---------------------------------------------------------------------------
def _environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": device.type if device.type == "cpu" else f"cuda ({name})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }


def _describe(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n:,} parameters"


def _progress(message: str) -> None:
    print(f"[hdl-bench] {message}", file=sys.stderr, flush=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every enabled section; return the results (what the JSON holds)."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = pick_device(str(cfg.device))
    clock, clock_name = pick_clock(device, torch.get_num_threads())
    start = time.perf_counter()
    preset = cfg.presets[cfg.preset]
    result: dict[str, Any] = {
        "preset": str(cfg.preset),
        "model": _describe(build_model(preset, int(cfg.classes))),
        "batch_size": int(cfg.batch_size),
        "classes": int(cfg.classes),
        "warmup": int(cfg.warmup),
        "repeats": int(cfg.repeats),
        "environment": _environment(device),
        "clock": clock_name,
    }
    _progress(f"loss variants ({len(cfg.variants)}) on {device.type}")
    result["variants"] = bench_variants(cfg, device, clock)
    if cfg.scaling.enabled:
        _progress("scaling with classes and input size")
        result["scaling"] = bench_scaling(cfg, device, clock)
    if cfg.exact_options.enabled:
        _progress("implementations of the exact term")
        result["exact_options"] = bench_exact_options(cfg, device, clock)
    if cfg.overhead.enabled:
        from hdl.bench_overhead import lightning_overhead

        _progress("Lightning overhead")
        result["overhead"] = lightning_overhead(cfg.overhead, device, clock, int(cfg.seed))
    if cfg.get("stacked") and cfg.stacked.enabled:
        from hdl.bench_stacked import bench_stacked

        _progress("stacked vs separate members")
        result["stacked"] = bench_stacked(
            cfg.stacked, cfg.variants, clock, build_loss=build_loss, make_step=make_step
        )
    result["seconds"] = time.perf_counter() - start
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if cfg.preset not in cfg.presets:
        print(
            f"error: preset must be one of {', '.join(cfg.presets)}, got {cfg.preset!r}",
            file=sys.stderr,
        )
        sys.exit(2)
    result = run(cfg)
    path = Path(cfg.output or Path(HydraConfig.get().runtime.output_dir) / "bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(report(result))
    print(f"\n{result['seconds']:.0f} s; JSON: {path}")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
