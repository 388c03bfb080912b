"""``moonprune compress``'s flags and ``--config`` recipe, merged into one config.

The recipe file is read first; every flag given overrides its key (``None`` = not
given); :func:`moonprune.config.build_config` validates the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moonprune.cli.flags import parse_json_object, parse_size, parse_temperature

if TYPE_CHECKING:
    from moonprune.config import CompressConfig

#: The options a run cannot do without: recipe key -> how the command line spells it.
REQUIRED = (("checkpoint", "CHECKPOINT"), ("data", "--data"), ("out", "--out"))


def recipe_overrides(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe keys (``name`` or ``section.name``) that ``compress``'s parameters
    ``flags`` set; a flag not given is ``None``, which overrides nothing."""
    return {
        "checkpoint": flags["checkpoint"],
        "data": flags["data"],
        "out": flags["out"],
        "arch": flags["arch"],
        "arch_kwargs": parse_json_object(flags["arch_kwargs"], "--arch-kwargs"),
        "ood": tuple(flags["ood"]) if flags["ood"] else None,
        "head_layer": flags["head_layer"],
        "device": flags["device"],
        "score": flags["score"],
        "tpr": flags["tpr"],
        "temperature": parse_temperature(flags["temperature"]),
        "normalize": flags["normalize"],
        "image_size": parse_size(flags["image_size"]),
        "channels": flags["channels"],
        "on_bad_image": flags["on_bad_image"],
        "workers": flags["workers"],
        "trust_checkpoint": True if flags["trust_checkpoint"] else None,
        "export": False if flags["no_export"] else None,
        "sparsity.method": flags["method"],
        "sparsity.sparsity": flags["sparsity"],
        "sparsity.distribution": flags["distribution"],
        "sparsity.macs_target": flags["macs_target"],
        "sparsity.steps": flags["prune_steps"],
        "sparsity.importance": flags["importance"],
        "sparsity.round_to": flags["round_to"],
        "sparsity.allocation": flags["allocation"],
        "sparsity.speedup": flags["speedup"],
        "sparsity.latency_batch": flags["latency_batch"],
        "sparsity.threads": flags["latency_threads"],
        "train.epochs": flags["epochs"],
        "train.lr": flags["lr"],
        "train.batch_size": flags["batch_size"],
        "train.augment": flags["augment"],
        "train.seed": flags["seed"],
        "moon.enabled": False if flags["no_moon"] else None,
        "moon.unknowns": flags["unknowns"],
        "moon.unknowns_fraction": flags["unknowns_fraction"],
        "moon.unknowns_weight": flags["unknowns_weight"],
        "moon.unknown_head": flags["unknown_head"],
        "gates.min_auroc": flags["min_auroc"],
        "gates.max_fpr95": flags["max_fpr95"],
        "gates.min_accuracy": flags["min_accuracy"],
        "gates.max_accuracy_drop": flags["max_accuracy_drop"],
        "gates.max_ece": flags["max_ece"],
        "gates.max_auroc_drop": flags["max_auroc_drop"],
    }


def compress_config(flags: Mapping[str, Any]) -> CompressConfig:
    """The run's config: the ``--config`` recipe (``flags["config"]``, if any) with the
    flags given on top. A recipe naming an ``arch`` must be matched by ``--arch``
    (:func:`moonprune.trust.checked_recipe_arch`)."""
    from moonprune.config import build_config
    from moonprune.errors import ConfigError
    from moonprune.recipe import merge, read_recipe
    from moonprune.trust import checked_recipe_arch

    config = flags["config"]
    recipe = read_recipe(config) if config is not None else {}
    checked_recipe_arch(recipe.get("arch"), flags["arch"], str(config))
    merged = merge(recipe, recipe_overrides(flags))
    for key, flag in REQUIRED:
        if not merged.get(key):
            raise ConfigError(
                f"missing {flag}: give it on the command line or as {key} = ... in the recipe"
            )
    return build_config(merged)
