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

import torch

KEY = "objective/holistic"


def validation_adversarial_accuracy(
    module, data, eps: float, attack: str, norm: str, steps: int
) -> float:
    """Accuracy of ``module.net`` on the whole validation split under ``attack`` at ``eps``."""
    from hdl.attacks import perturb

    x, y = data.tensors["val"]
    net = module.net
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    correct = 0
    try:
        for start in range(0, len(y), data.eval_batch_size):
            xb = x[start : start + data.eval_batch_size].to(device)
            yb = y[start : start + data.eval_batch_size].to(device)
            with torch.enable_grad():
                x_adv = perturb(
                    net,
                    xb,
                    yb,
                    eps=eps,
                    attack=attack,
                    norm=norm,
                    steps=steps,
                    input_range=data.input_range,
                    task=data.task,
                    num_classes=data.num_outputs,
                    seed=start,
                )
            with torch.no_grad():
                correct += int((net(x_adv).argmax(1) == yb).sum())
    finally:
        net.train(was_training)
    return correct / len(y)


def holistic_objective(
    metrics: Mapping[str, float],
    module,
    data,
    objective: Mapping[str, Any],
    eval_cfg: Mapping[str, Any],
) -> dict[str, float]:
    """The objective and the validation adversarial accuracy it uses, as new metric entries."""
    if data.task != "classification":
        return {}
    eps = float(objective.get("eps", 0.1))
    adv_key = f"val/{eval_cfg['attack']}_acc@{eps:g}"
    adv = validation_adversarial_accuracy(
        module, data, eps, str(eval_cfg["attack"]), str(eval_cfg["norm"]), int(eval_cfg["steps"])
    )
    w = objective.get("weights", {})
    value = (
        float(w.get("acc", 1.0)) * float(metrics["val/acc"])
        + float(w.get("adv", 1.0)) * adv
        + float(w.get("sparsity", 0.5)) * float(metrics.get("sparsity/zero_fraction", 0.0))
    )
    return {adv_key: adv, KEY: value}
