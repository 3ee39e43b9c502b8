import argparse

import pytest

from mlx_rft.config import GRPOConfig, add_config_arguments, build_config, config_from_args
from mlx_rft.errors import MlxRftError


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p.parse_args(argv)


def test_precedence_flag_over_yaml_over_default(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("learning_rate: 0.001\ngroup_size: 8\nloss_type: grpo\nstop: ['###']\n")
    cfg = config_from_args(parse(["--config", str(y), "--group-size", "6"]))
    assert cfg.group_size == 6  # flag beats YAML
    assert cfg.learning_rate == 0.001 and cfg.loss_type == "grpo"  # YAML beats default
    assert cfg.stop == ["###"]
    assert cfg.max_new_tokens == GRPOConfig().max_new_tokens  # default


def test_list_and_bool_flags():
    cfg = config_from_args(parse(["--reward-funcs", "accuracy", "format", "--reward-weights", "1", "0.5",
                                  "--drop-zero-std-groups", "true"]))
    assert cfg.reward_funcs == ["accuracy", "format"]
    assert cfg.reward_weights == [1.0, 0.5]
    assert cfg.drop_zero_std_groups is True


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"group_size": 1}, ["group_size=1", "2 or more"]),
        ({"gradient_accumulation_steps": 3}, ["gradient_accumulation_steps=3", "32 completions"]),
        ({"loss_type": "ppo"}, ["loss_type='ppo'", "dapo"]),
        ({"reward_funcs": ["a", "b"], "reward_weights": [1.0]}, ["1 reward_weights for 2"]),
        ({"beta": 0.1, "finetune_type": "dora"}, ["dora"]),
        ({"quantize_bits": 4, "finetune_type": "full"}, ["QLoRA"]),
        ({"temperature": 0.0}, ["temperature"]),
        # Rules that used to run only after the model had loaded (the loss's and the sampler's
        # own rules included): every one runs before anything heavy.
        ({"epsilon": 1.0}, ["epsilon=1.0"]),
        ({"repetition_penalty": 0}, ["repetition_penalty=0"]),
        ({"stop": [""]}, ["stop"]),
        ({"lora_dropout": 1.0}, ["lora_dropout=1.0"]),
        ({"log_every": 0}, ["log_every=0"]),
        ({"lora_layers": 0}, ["lora_layers=0", "-1"]),
        ({"eval_size": 0}, ["eval_size=0"]),
        ({"reward_timeout": -1}, ["reward_timeout=-1"]),
        ({"resume": "latest", "overwrite": True}, ["overwrite"]),
    ],
)
def test_validation_names_rule_values_and_fix(overrides, words):
    with pytest.raises(MlxRftError) as e:
        build_config(overrides).validate()
    for w in words:
        assert w in str(e.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(MlxRftError, match="unknown config field 'learning_rat'.*learning_rate"):
        build_config(yaml_path=str(bad))
    wrong_type = tmp_path / "t.yaml"
    wrong_type.write_text("group_size: many\n")
    with pytest.raises(MlxRftError, match="group_size.*expects int"):
        build_config(yaml_path=str(wrong_type))
    with pytest.raises(MlxRftError, match="does not exist"):
        build_config(yaml_path=str(tmp_path / "nope.yaml"))


def test_every_field_has_help():
    import dataclasses

    for f in dataclasses.fields(GRPOConfig):
        assert f.metadata.get("help"), f.name
