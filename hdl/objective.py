"""The model-selection objective for hyper-parameter search: one number for "holistic".

    objective/holistic = w_acc · val/acc + w_adv · val/<attack>_acc@eps + w_sparse · zero_fraction

All three parts are fractions in [0, 1] measured on the **validation** split (never on test,
which stays untouched for the final comparison): natural accuracy, accuracy under the eval
attack (``eval.attack``, ``eval.norm``, ``eval.steps``) at radius ``objective.eps``, and the
fraction of weights that are exactly zero. Classification only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hdl.eval_config import EvalConfig
from hdl.keys import metric_key

KEY = "objective/holistic"


def validation_adversarial_accuracy(module, data, eps: float, ev: EvalConfig) -> float:
    """Robust accuracy of ``module.net`` on the whole validation split under the eval attack at
    ``eps``: a point counts only when it is correct on the clean input and under attack."""
    from hdl.attacks import evaluate_under_attack

    x, y = data.tensors["val"]
    results = evaluate_under_attack(
        module.net,
        x,
        y,
        eps_list=[eps],
        attack=ev.attack,
        norm=ev.norm,
        steps=ev.steps,
        input_range=data.input_range,
        task=data.task,
        num_classes=data.num_outputs,
        batch_size=data.eval_batch_size,
        queries=ev.square_queries,
    )
    return results[float(eps)]["accuracy"]


def holistic_objective(
    metrics: Mapping[str, float], module, data, objective: Mapping[str, Any]
) -> dict[str, float]:
    """The objective and the validation adversarial accuracy it uses, as new metric entries."""
    if data.task != "classification":
        return {}
    eps = float(objective.get("eps", 0.1))
    ev = module.eval_cfg
    adv = validation_adversarial_accuracy(module, data, eps, ev)
    w = objective.get("weights", {})
    value = (
        float(w.get("acc", 1.0)) * float(metrics["val/acc"])
        + float(w.get("adv", 1.0)) * adv
        + float(w.get("sparsity", 0.5)) * float(metrics.get("sparsity/zero_fraction", 0.0))
    )
    return {metric_key("val", ev.attack, "acc", eps): adv, KEY: value}
