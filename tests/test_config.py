"""VariatorConfig: defaults, validation with errors that name the field, and JSON round-trip."""

import pytest
from peft import PeftConfig
from peft.utils import PeftType

from peft_variator import VARIATOR, VariatorConfig


def test_defaults_follow_the_paper():
    config = VariatorConfig()
    assert config.ratio == 4
    assert config.adapter_dim == 64
    assert config.peft_type == VARIATOR == PeftType.VARIATOR


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": 1}, "ratio"),
        ({"ratio": 0}, "ratio"),
        ({"ratio": 2.5}, "ratio"),
        ({"ratio": "4"}, "ratio"),
        ({"ratio": True}, "ratio"),
        ({"ratio": float("inf")}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"adapter_dim": 0}, "adapter_dim"),
        ({"adapter_dim": 3.5}, "adapter_dim"),
        ({"adapter_dim": float("inf")}, "adapter_dim"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": 3}, "target_modules"),
        ({"layers_to_transform": -1}, "layers_to_transform"),
        ({"layers_to_transform": [0, "1"]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"exact_last_token": "yes"}, "exact_last_token"),
        ({"exact_last_token": 1}, "exact_last_token"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        VariatorConfig(**kwargs)


def test_integral_float_ratio_is_accepted_as_int():
    assert VariatorConfig(ratio=8.0).ratio == 8


def test_config_round_trips_through_json(tmp_path):
    config = VariatorConfig(
        ratio=8, adapter_dim=32, layers_to_transform=[0, 2], modules_to_save=["classifier"], exact_last_token=False
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VariatorConfig)
    assert (
        loaded.ratio,
        loaded.adapter_dim,
        loaded.layers_to_transform,
        loaded.modules_to_save,
        loaded.exact_last_token,
    ) == (8, 32, [0, 2], ["classifier"], False)
    assert loaded.peft_type == VARIATOR


def test_layers_to_transform_takes_any_iterable_of_indices_and_saves_as_json(tmp_path):
    import numpy as np

    config = VariatorConfig(ratio=np.int64(4), layers_to_transform=range(1, 4))
    assert config.ratio == 4 and type(config.ratio) is int
    assert config.layers_to_transform == [1, 2, 3]
    assert VariatorConfig(layers_to_transform=np.int64(2)).layers_to_transform == 2
    # Every iterable, a list too, is saved the same way: sorted, each layer once.
    assert VariatorConfig(layers_to_transform=[3, 1, 3]).layers_to_transform == [1, 3]
    assert VariatorConfig(layers_to_transform=(3, 1)).layers_to_transform == [1, 3]
    config.save_pretrained(tmp_path)
    assert VariatorConfig.from_pretrained(tmp_path).layers_to_transform == [1, 2, 3]
