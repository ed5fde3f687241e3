"""Config loading: strict keys and types, overrides, semantics."""

import re
from pathlib import Path

import pytest

from usnet.train.config import (
    ConfigError,
    TrainConfig,
    config_from_saved,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
FASHION = REPO / "configs" / "fashion_mnist.yaml"


def test_shipped_configs_load():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert FASHION in paths
    for path in paths:
        config = load_config(path)
        assert isinstance(config, TrainConfig)


def test_required_keys_exist_with_their_names():
    config = load_config(FASHION)
    for key in ("model", "width_range", "num_widths", "inplace_distill", "epochs", "batch_size",
                "lr", "seed"):  # fmt: skip
        assert hasattr(config, key)
    for key in ("name", "root", "limit_train"):
        assert hasattr(config.data, key)
    assert hasattr(config.eval, "widths") and hasattr(config.calib, "num_images")


def test_overrides_are_typed_and_dotted():
    config = load_config(FASHION,
                         ["epochs=1", "data.limit_train=3000", "width_range=[0.3, 0.9]",
                          "inplace_distill=false", "lr=0.05"])  # fmt: skip
    assert config.epochs == 1 and config.data.limit_train == 3000
    assert config.width_range == [0.3, 0.9]
    assert config.inplace_distill is False and config.lr == 0.05


def test_misspelled_key_is_an_error_naming_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inplace_distil: true\n")
    with pytest.raises(ConfigError, match="unknown config key 'inplace_distil'.*inplace_distill"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'data.limit'.*limit_train"):
        load_config(None, ["data.limit=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=one", "epochs: expected an integer"),
        ("epochs=1.5", "epochs: expected an integer"),
        ("inplace_distill=yes please", "inplace_distill: expected true or false"),
        ("lr=fast", "lr: expected a number"),
        (
            "mode=ensemble",
            "mode: invalid value 'ensemble'; valid: universal, individual, slimmable",
        ),
        ("data.name=mnist", "data.name: invalid value 'mnist'"),
        ("width_range=[0.5, 1.5]", "width_range must be"),
        ("num_widths=1", "num_widths must be at least 2"),
        ("mode=individual", "mode=individual needs width="),
        ("eval.widths=1:0:1", "eval.widths"),
        ("batch_size=0", "batch_size must be positive"),
        ("device=tpu", "device: invalid value 'tpu'"),
        ("device=cuda:x", "device: invalid value 'cuda:x'; valid: auto, cpu, cuda, cuda:N"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_parse_override_requires_key_value():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("epochs")


def test_exponent_floats_and_non_finite_numbers(tmp_path):
    assert load_config(None, ["lr=1e-3"]).lr == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 5e-5\n")
    assert load_config(path).weight_decay == 5e-5
    with pytest.raises(ConfigError, match="lr: expected a finite number"):
        load_config(None, ["lr=.nan"])


@pytest.mark.parametrize(
    "override",
    ["eval.epoch_calib_images=0", "calib.batch_size=0", "data.limit_train=-5",
     "data.limit_test=0", "data.num_workers=-1", "data.image_size=0"],
)  # fmt: skip
def test_out_of_range_values_fail_before_training(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_optimizer_adamw_with_betas_from_overrides():
    config = load_config(FASHION, ["optimizer=adamw", "betas=[0.9, 0.95]", "lr=1e-3"])
    assert config.optimizer == "adamw" and config.betas == [0.9, 0.95] and config.lr == 1e-3
    default = load_config(FASHION)
    assert default.optimizer == "sgd" and default.betas == [0.9, 0.999]
    assert load_config(None, ["optimizer=adamw", "momentum=0.9", "nesterov=true"])  # defaults


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer=adam"], "optimizer: invalid value 'adam'; valid: sgd, adamw"),
        (["optimizer=adamw", "momentum=0.5"], "momentum=0.5 applies to optimizer=sgd only"),
        (["optimizer=adamw", "nesterov=false"], "nesterov=False applies to optimizer=sgd only"),
        (["betas=[0.9, 0.95]"], "betas=[0.9, 0.95] applies to optimizer=adamw only"),
        (["optimizer=adamw", "betas=[0.9]"], "betas must be [beta1, beta2]"),
        (["optimizer=adamw", "betas=[0.9, 1.0]"], "betas must be [beta1, beta2], each in [0, 1)"),
        (["momentum=0"], "nesterov=true needs momentum > 0"),
        (["momentum=-0.1", "nesterov=false"], "momentum must not be negative"),
    ],
)
def test_optimizer_settings_of_the_other_optimizer_are_refused(overrides, message):
    """A setting the chosen optimizer would not use is an error, not silently ignored."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_saved_config_from_before_the_optimizer_key_resumes_as_sgd():
    saved = TrainConfig().to_dict()
    del saved["optimizer"], saved["betas"]
    config = config_from_saved(saved)
    assert config.optimizer == "sgd" and config.betas == [0.9, 0.999]
    assert config == TrainConfig()
