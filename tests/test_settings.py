"""ADTR's settings object: a recipe plus the settings that differ, given by object, by name or as a dict."""

from __future__ import annotations

import dataclasses

import jsonargparse
import pytest

from adtr_anomalib import ADTR, ADTRPlus, ADTRSettings
from adtr_anomalib.models.adtr.components.settings import PAPER_SETTINGS, RECIPES
from adtr_anomalib.models.adtr.lightning_base import constructor_parameters
from tests.conftest import TINY

LITE0 = {"backbone": "tf_efficientnet_lite0", "pre_trained": False}


def test_a_user_needs_a_recipe_and_the_settings_that_differ() -> None:
    """Backbone arguments, recipe, settings and the cache, then anomalib's four components; nothing else."""
    assert list(constructor_parameters(ADTR)) == [
        "backbone", "layers", "pre_trained", "weights", "recipe", "settings", "cache_features",
        "pre_processor", "post_processor", "evaluator", "visualizer",
    ]  # fmt: skip
    assert set(PAPER_SETTINGS) >= {key for recipe in RECIPES.values() for key in recipe}


def test_settings_by_object_by_name_and_as_a_dict_are_the_same() -> None:
    by_object = ADTR(**LITE0, recipe="fast", settings=ADTRSettings(lr=5e-4, **TINY))
    by_name = ADTR(**LITE0, recipe="fast", lr=5e-4, **TINY)
    as_dict = ADTR(**LITE0, recipe="fast", settings={"lr": 5e-4, **TINY})
    assert by_object.settings == by_name.settings == as_dict.settings
    assert by_object.settings.lr == 5e-4  # the user's value
    assert by_object.settings.warmup_steps == RECIPES["fast"]["warmup_steps"]  # the recipe's
    assert by_object.settings.hidden_dim == by_object.model.reconstructor.query_embed.shape[-1] == TINY["hidden_dim"]
    assert ADTR(**LITE0).settings == ADTRSettings(**PAPER_SETTINGS)  # no recipe, no settings: the paper's


def test_a_setting_given_wins_over_the_recipe_even_at_the_paper_value() -> None:
    """Also from a config, where jsonargparse builds the whole ADTRSettings: unset fields are None there."""
    assert ADTR(**LITE0, recipe="fast", **TINY).settings.normalize_map  # the recipe's
    assert not ADTR(**LITE0, recipe="fast", normalize_map=False, **TINY).settings.normalize_map  # by name
    assert not ADTR(**LITE0, recipe="fast", settings=ADTRSettings(normalize_map=False)).settings.normalize_map
    off = ADTR(**LITE0, recipe="fast", settings={"gradient_clip_val": 0.0})
    assert off.trainer_arguments["gradient_clip_val"] is None  # 0: no clipping, as Lightning's None
    assert ADTR(**LITE0, recipe="fast").trainer_arguments["gradient_clip_val"] == RECIPES["fast"]["gradient_clip_val"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"hiden_dim": 32}, r"unknown ADTR settings \['hiden_dim'\]; the settings are \['feature_stride'"),
        ({"settings": {"lr": 1e-3}, "lr": 5e-4}, r"\['lr'\] given both by name and in `settings`"),
        ({"settings": "fast"}, "settings must be an ADTRSettings, a dict of its fields or None, got str"),
        ({"recipe": "quick"}, r"recipe must be one of \['fast'"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val must be 0 \\(no clipping\\)"),
        ({"adtr_checkpoint": "adtr.ckpt"}, r"saved by ADTRPlus, not ADTR\..*ADTRPlus\.load_from_checkpoint"),
    ],
)
def test_wrong_settings_are_refused_with_their_names(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ADTR(**LITE0, **arguments)


@pytest.mark.parametrize("model_class", [ADTR, ADTRPlus])
def test_saved_hyper_parameters_rebuild_the_model_in_both_shapes(model_class: type) -> None:
    """Today's nested settings and the flat arguments of earlier checkpoints give the same model, even where a
    setting was asked for at the paper's value under a recipe that changes it."""
    model = model_class(**LITE0, recipe="fast", normalize_map=False, **TINY)
    saved = dict(model.hparams)
    assert saved["settings"] == dataclasses.asdict(model.settings)
    flat = {key: value for key, value in saved.items() if key != "settings"} | saved["settings"]
    for hyper_parameters in (saved, flat):
        restored = model_class(**hyper_parameters)
        assert restored.settings == model.settings
        assert not restored.settings.normalize_map


def test_the_cli_takes_settings_under_their_own_key() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ADTR, "model")
    arguments = ["--model.recipe", "fast", "--model.settings.lr", "5e-4", "--model.settings.normalize_map", "false"]
    model = parser.instantiate_classes(parser.parse_args([*arguments, "--model.pre_trained", "false"])).model
    assert (model.settings.lr, model.settings.warmup_steps) == (5e-4, RECIPES["fast"]["warmup_steps"])
    assert not model.settings.normalize_map  # the paper's value, asked for: not overridden by the recipe
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--model.settings.hiden_dim", "32"])
