import pytest

from sslaudio.build import load_preset
from sslaudio.config import ConfigError, list_presets


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes'.*did you mean 'steps'"):
        load_preset("tiny/byol-a", ["train.stpes=3"])


def test_wrong_type_names_path():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer"):
        load_preset("tiny/byol-a", ["train.batch_size=abc"])


def test_component_key_checked_against_its_config():
    with pytest.raises(ConfigError, match=r"unknown key 'encoder.dd'.*did you mean 'd'"):
        load_preset("tiny/byol-a", ["encoder.dd=4"])
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'byol-aa'.*did you mean 'byol-a'"):
        load_preset("tiny/byol-a", ["method.name=byol-aa"])


def test_overrides_apply_and_types_coerce():
    p = load_preset("tiny/byol-a", ["train.steps=7", "optim.lr=1"])
    assert p.train.steps == 7 and isinstance(p.optim.lr, float) and p.optim.lr == 1.0


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny/byol-aa'.*did you mean 'tiny/byol-a'"):
        load_preset("tiny/byol-aa")


def test_method_needs_are_checked():
    with pytest.raises(ConfigError, match="needs a 'views'"):
        load_preset("tiny/byol-a", ["views=[]"])
    with pytest.raises(ConfigError, match="frontend.name"):
        load_preset("tiny/byol-a", ["frontend={name: waveform}"])


def test_identity_ignores_logging_but_not_training():
    a = load_preset("tiny/byol-a")
    assert a.identity() == load_preset("tiny/byol-a", ["train.log_every=3"]).identity()
    assert a.identity() != load_preset("tiny/byol-a", ["optim.lr=0.5"]).identity()


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_with_description(name):
    p = load_preset(name)
    assert p.description, f"{name} needs a one-line description"
    assert "\n" not in p.description
