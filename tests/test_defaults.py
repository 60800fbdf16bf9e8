"""One source per default: `ddpm_jax/experiment/defaults.py` states every default, the typed
views that check a config state none, and the two name the same fields."""

import dataclasses

import pytest

from ddpm_jax.data.config import DataConfig
from ddpm_jax.experiment import ExperimentConfig, ReverseProcess, SamplingOptions, defaults
from ddpm_jax.experiment import config as views
from ddpm_jax.models.config import ModelConfig

# Each group's view; the model's also holds two fields of the data group.
GROUP_VIEWS = {
    "data": (DataConfig, ()),
    "model": (ModelConfig, ("image_size", "in_channels")),
    "diffusion": (views.DiffusionConfig, ()),
    "edm": (views.EDMConfig, ()),
    "training": (views.TrainingConfig, ()),
    "optim": (views.OptimConfig, ()),
    "sampling": (views.SamplingConfig, ()),
    "eval": (views.EvalConfig, ()),
    "mesh": (views.MeshConfig, ()),
}


def test_every_group_has_a_view_and_nothing_else():
    assert set(defaults.get_config().keys()) == set(GROUP_VIEWS) == set(views.GROUPS)


@pytest.mark.parametrize("group", sorted(GROUP_VIEWS))
def test_the_view_of_a_group_names_its_fields_and_states_no_default(group):
    cls, from_elsewhere = GROUP_VIEWS[group]
    names = [f.name for f in dataclasses.fields(cls) if f.name not in from_elsewhere]
    assert sorted(names) == sorted(defaults.get_config()[group].keys())
    with_default = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not with_default, f"{cls.__name__} states defaults {with_default}: defaults.py does"


@pytest.mark.parametrize("cls", [ReverseProcess, SamplingOptions, ExperimentConfig])
def test_the_derived_views_state_no_default_either(cls):
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls))


def test_the_defaults_are_a_valid_config_and_the_views_keep_them():
    config = defaults.get_config()
    parsed = ExperimentConfig.from_config(config)
    for group in GROUP_VIEWS:
        view = getattr(parsed, group)
        for field, value in config[group].items():
            got = getattr(view, field)
            assert (list(got) if isinstance(got, tuple) else got) == (
                list(value) if isinstance(value, tuple) else value
            ), f"{group}.{field}"


def test_a_missing_field_is_refused_naming_the_defaults_file():
    config = defaults.get_config().to_dict()
    del config["model"]["dropout"]
    with pytest.raises(ValueError, match=r"config\.model is missing field\(s\) \['dropout'\].*"
                       r"ddpm_jax/experiment/defaults\.py"):  # fmt: skip
        ExperimentConfig.from_config(config)


def test_group_helper_refuses_unknown_fields():
    assert defaults.group("mesh", fsdp=True)["fsdp"] is True
    with pytest.raises(KeyError, match="no field"):
        defaults.group("mesh", fsdpp=True)
