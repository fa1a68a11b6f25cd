"""configs/ppo.py presets: docs/method.md's numbers on vicuna7b, valid settings on every preset."""

import pytest

from configs import ppo as ppo_configs
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.ppo.trainer import ppo_optimizer, settings_from_config


@pytest.mark.parametrize("preset", sorted(ppo_configs.PRESETS))
def test_presets_give_valid_settings(preset):
    config = ppo_configs.get_config(preset)
    settings = settings_from_config(config, eos_token_id=2, pad_token_id=0)
    tx, schedule = ppo_optimizer(config, settings)
    warmup = config.optim.warmup_iterations * settings.steps_per_iteration
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup)) == pytest.approx(config.optim.lr)
    total = config.num_iterations * settings.steps_per_iteration
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-12)


def test_vicuna7b_is_the_reference_recipe():
    config = ppo_configs.get_config("vicuna7b")
    s = settings_from_config(config, eos_token_id=2, pad_token_id=0)
    assert (s.rollout_batch_size, s.minibatch_size, s.epochs, s.max_new_tokens) == (256, 128, 2, 896)
    assert (s.temperature, s.kl_coef, s.kl_estimator, s.clip, s.value_clip, s.value_coef) == (
        1.0, 0.1, "k1", 0.2, 0.2, 0.1)
    assert (s.no_eos_penalty, s.length_penalty, s.reward_scale, s.gamma, s.lam) == (
        -8.0, -10.0, 10.0, 1.0, 1.0)
    assert not s.reference_pads and not s.truncate_at_question_mark
    assert config.optim.lr == 3e-5 and config.optim.warmup_iterations == 5
    assert config.optim.weight_decay == 0.0 and config.optim.grad_clip == 1.0
    assert s.steps_per_iteration == 4
    assert config.ppo.max_prompt_length == 128
    assert not config.critic_shares_base and config.critic_model.llm.num_layers == 40
    assert config.model.llm.lora.rank == 64 and config.critic_model.llm.lora.rank == 64


def test_bad_batch_sizes_fail_at_start():
    config = ppo_configs.get_config("tiny")
    with config.unlocked():
        config.ppo.minibatch_size = 48
    with pytest.raises(ConfigError, match="multiple of ppo.minibatch_size"):
        settings_from_config(config, 2, 0)


def test_rollout_rules_override_the_training_rules():
    from rlaif_jax.parallel.sharding import DEFAULT_RULES
    from rlaif_jax.ppo.stage import rollout_rules

    config = ppo_configs.get_config("tiny")
    assert rollout_rules(config) is None  # sampling in the training layout
    with config.unlocked():
        config.rules = (("mlp", None),)
        config.rollout_rules = (("embed", None), ("heads", ["fsdp", "tensor"]))
    rules = dict(rollout_rules(config))
    assert rules["embed"] is None and rules["heads"] == ("fsdp", "tensor")
    assert rules["mlp"] is None  # the training overrides hold for sampling too
    assert {k: v for k, v in rules.items() if k not in ("embed", "heads", "mlp")} == {
        k: v for k, v in DEFAULT_RULES if k not in ("embed", "heads", "mlp")}
