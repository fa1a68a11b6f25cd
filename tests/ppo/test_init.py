"""PPO's starting tree from real stage directories (rlaif_jax/ppo/init.py).

Two reward-model stages are trained for two steps by the RM stage itself (reward.py, run_stage)
on the small synthetic world's preference pairs: the tiny preset's kind (fully fine-tuned LLM +
head, vision frozen) and the vicuna13b preset's kind (a LoRA adapter + head over a frozen
backbone). A one-step text SFT stage with a LoRA adapter stands in for the policy init. For each
RM (the full one with the likelihood term, the adapter one without), the reward model PPO loads
scores rows exactly as the RM stage's own model, restored the way
the stage resumes, scores the same rows; the value model starts as the RM backbone with a zero
head; the policy and reference are the policy-init adapter on its base.
"""

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pytest
import transformers

from configs import models as model_presets
from configs import rm as rm_configs
from configs import sft as sft_configs
from rlaif_jax.checkpoints.orbax_io import Checkpoints, read_step_dir
from rlaif_jax.engine.model_init import model_from_config
from rlaif_jax.data import conversation
from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.models.lora import merge_lora
from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.parallel.sharding import make_rules
from rlaif_jax.engine import optim
from rlaif_jax.engine.loop import LoopOptions, run_stage
from rlaif_jax.ppo.init import load_actor_critic
from rlaif_jax.ppo.prompts import rm_suffix_ids
from rlaif_jax.rm.stage import build_rm_stage, pair_rewards
from rlaif_jax.sft.stage import build_sft_stage
from tests.support import override

OPTIONS = LoopOptions(checkpoint_every=2, keep_checkpoints=3, async_checkpoints=False,
                      log_every=10, eval_every=0, tensorboard=False, progress=False)
VALUE_LORA = dict(rank=4, alpha=8.0, targets="(q_proj|v_proj)")


def _mesh():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])  # compiles fastest


@pytest.fixture(scope="module")
def policy_stage(tmp_path_factory):
    """A text SFT stage with a LoRA r 4 adapter, one step: PPO's policy init."""
    workdir = tmp_path_factory.mktemp("ppo_init_policy")
    config = override(sft_configs.get_config("reverse"), workdir=str(workdir), num_steps=2,
                  trainable="lora/.*", max_replicated_share=1.0,
                  **{"model.lora.rank": 4, "model.lora.alpha": 8.0, "optim.lr": 3e-2})
    stage = dataclasses.replace(build_sft_stage(config, _mesh()), evaluate=None)
    run_stage(stage, str(workdir / "policy_init"), OPTIONS)
    return str(workdir / "policy_init")


def _rm_config(workdir, world, adapter: bool):
    model = model_presets.get_config("video_tiny")
    model.llm.update(dict(hidden_size=64, intermediate_size=128, num_layers=2))
    config = override(rm_configs.get_config("vicuna13b" if adapter else "smoke"),
                  workdir=str(workdir), world_dir=world, init_model_from_checkpoint=False,
                  preferences=os.path.join(world, "preferences_oracle.json"),
                  model=ml_collections.ConfigDict(model.to_dict()), num_steps=2, batch_size=4,
                  accum_steps=1, max_length=160, max_replicated_share=1.0,
                  **{"eval.batch_size": 4, "log.eval_every": 0, "checkpoint.every": 2,
                     "checkpoint.async_save": False, "optim.lr": 3e-2,
                     "optim.warmup_ratio": 0.0, "mesh.fsdp": 1})
    if adapter:
        override(config, **{"lora.rank": 4, "lora.alpha": 8.0})
    return config


@pytest.fixture(scope="module", params=["full", "adapter"])
def rm_stage(request, tmp_path_factory, world_dir):  # noqa: F811
    """(config, stage dir, stage, its frozen variables) of a trained RM stage of either kind."""
    workdir = tmp_path_factory.mktemp(f"ppo_init_rm_{request.param}")
    config = _rm_config(workdir, world_dir, request.param == "adapter")
    stage, stage_dir, _ = build_rm_stage(config, _mesh())
    fresh = {}

    def fresh_state():  # the stage's own; its frozen tree is kept (never donated)
        fresh["state"], fresh["frozen"] = stage.fresh_state()
        return fresh["state"], fresh["frozen"]

    run_stage(dataclasses.replace(stage, evaluate=None, fresh_state=fresh_state), stage_dir,
              OPTIONS)
    return config, stage_dir, stage, fresh["frozen"]


def _rm_stage_scores(rm_stage, tokenizer, batch):
    """The RM stage's own scoring: its state as a resumed run gets it (the latest checkpoint
    restored into the stage's layout, the frozen variables of its fresh state), then the
    stage's `pair_rewards` on the model its config builds."""
    config, stage_dir, stage, frozen = rm_stage
    manager = Checkpoints(os.path.join(stage_dir, "checkpoints"), 1, 1, False)
    state, _ = manager.restore(manager.latest_step(), stage.layout.abstract_state_sharded)
    manager.close()
    adapter = {"lora": config.lora.to_dict()} if config.lora.rank > 0 else {}
    model, _ = model_from_config(config.model_kind, config.model, tokenizer=tokenizer,
                                 reward_head=True, **adapter)
    scores = jax.jit(lambda v, b: pair_rewards(model, v, b, config.likelihood_weight))
    return np.asarray(scores(optim.merge_trees(state.params, frozen), batch))


@pytest.fixture(scope="module")
def loaded(rm_stage, policy_stage, world_dir):  # noqa: F811
    """PPO's models and starting tree over that RM and the policy init (the tiny preset's
    `critic_shares_base=True`, which cannot hold here: the text policy is no video RM's base)."""
    config, stage_dir = rm_stage[:2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(world_dir, "tokenizer"))
    args = (os.path.dirname(stage_dir), policy_stage, stage_dir, _mesh(), make_rules(),
            tokenizer, VALUE_LORA, True)
    run = load_actor_critic(*args)
    return rm_stage, tokenizer, args, run, jax.device_get(run.variables())


def _ppo_rows(pipe, local, tokenizer):
    """The pipeline's RM rows cut into PPO's layout: prompt (left-padded) + response
    (right-padded, each row by another amount) + the RM suffix, candidates flattened."""
    prompts, responses, suffix = [], [], None
    for pair, index in enumerate(local["index"]):
        turn = {"from": "human", "value": pipe.record(int(index))["values"][0]}
        prompt = conversation.tokenize_prompt(turn, tokenizer)
        suffix = rm_suffix_ids(tokenizer, turn)
        for candidate in range(2):
            ids = local["input_ids"][pair, candidate]
            ids = ids[local["attention_mask"][pair, candidate] > 0]
            np.testing.assert_array_equal(ids[:len(prompt)], prompt)
            np.testing.assert_array_equal(ids[len(ids) - len(suffix):], suffix)
            prompts.append(prompt)
            responses.append(ids[len(prompt):len(ids) - len(suffix)])
    width_p = max(map(len, prompts)) + 2
    width_r = max(map(len, responses)) + 3
    rows = {k: np.zeros((len(prompts), w), np.int32) for k, w in (
        ("prompt_ids", width_p), ("prompt_mask", width_p), ("response", width_r),
        ("mask", width_r))}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        rows["prompt_ids"][i, width_p - len(prompt):] = prompt
        rows["prompt_mask"][i, width_p - len(prompt):] = 1
        rows["response"][i, :len(response)] = response
        rows["mask"][i, :len(response)] = 1
    rows["has_video"] = np.repeat(local["has_video"], 2)
    return rows, suffix


def test_ppo_rm_scores_as_the_rm_stage_and_value_starts_as_its_backbone(loaded):
    rm_stage, tokenizer, _, run, tree = loaded
    config, stage_dir = rm_stage[:2]
    adapter = config.lora.rank > 0
    models = run.models
    assert not models.critic_shares_base and models.rm_has_adapter == adapter
    # The full RM (the tiny preset's kind) has the likelihood term, the adapter one (vicuna13b's)
    # the paper's head alone: PPO scores both as their stage did.
    assert models.rm_likelihood_weight == config.likelihood_weight == (0.0 if adapter else 1.0)
    saved = read_step_dir(run.rm_step)[0]
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(tree["rm"]["head"], saved["params"]["reward_head"])
    if adapter:
        same(tree["rm"]["lora"], saved["lora"])
        same(tree["value"]["lora"], saved["lora"])  # the value adapter starts as the RM's
    else:
        assert "lora" not in tree["rm"]
        same(tree["critic"]["params"]["llm"], saved["params"]["llm"])
        assert all(not np.any(b) for p, b in jax.tree_util.tree_flatten_with_path(
            tree["value"]["lora"])[0] if "lora_b" in optim.path_str(p))
    assert all(not np.any(x) for x in jax.tree.leaves(tree["value"]["head"]))
    policy_saved = read_step_dir(run.policy_step)[0]
    same(tree["policy"]["lora"], policy_saved["lora"])
    same(tree["reference"]["lora"], policy_saved["lora"])

    # Two of the RM stage's held-out pairs, as its pipeline writes them.
    pipe = Pipeline(os.path.join(stage_dir, "data", "build"), "heldout", tokenizer, 2,
                    config.max_length, config.seed, shuffle=False,
                    num_frames=models.critic.config.num_frames)
    local = pipe.batch(0)
    batch = {k: local[k] for k in ("input_ids", "attention_mask", "response_mask", "frames",
                                   "has_video")}
    want = _rm_stage_scores(rm_stage, tokenizer, batch)
    assert np.ptp(want) > 1e-4  # the rows tell the RM something

    # PPO's scoring of the same rows, video tokens computed once by the critic's tower.
    rows, suffix = _ppo_rows(pipe, local, tokenizer)

    @jax.jit
    def ppo_scores(tree, rows, frames):
        video = models.encode_video(tree, frames, critic=True)
        rows = dict(rows, critic_video_tokens=jax.numpy.repeat(video, 2, axis=0))
        return models.rm_scores(tree, rows, suffix)

    got = np.asarray(ppo_scores(tree, rows, local["frames"])).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_full_finetune_folds_the_policy_adapter_into_a_trained_base(loaded):
    rm_stage, _, args, lora_run, lora_tree = loaded
    if rm_stage[0].lora.rank > 0:
        pytest.skip("one RM kind is enough: the policy side is the same")
    full_run = load_actor_critic(*args, full_finetune=True)
    assert full_run.models.full_finetune and not full_run.models.critic_shares_base
    assert full_run.models.trainable_regex().startswith("policy/params/")
    full_tree = jax.device_get(full_run.variables())
    assert "lora" not in full_tree["policy"] and "lora" not in full_tree["reference"]
    merged = merge_lora(lora_tree["policy"]["params"], lora_tree["policy"]["lora"],
                        lora_run.models.policy.config.lora)
    for name in ("policy", "reference"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     full_tree[name]["params"], jax.device_get(merged))
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(full_tree["policy"]["params"]),
                                              jax.tree.leaves(lora_tree["policy"]["params"])))
    # The policy and the reference compute what the policy init's adapter did.
    batch = {"prompt_ids": np.array([[1, 5, 6, 7]]), "prompt_mask": np.ones((1, 4), np.int32),
             "response": np.array([[8, 9, 3]]), "mask": np.ones((1, 3), np.int32)}
    outputs = lambda models, tree, **kw: models.policy_outputs(tree, batch, **kw)[0]  # noqa
    lora_logp = jax.jit(lambda t: outputs(lora_run.models, t))(lora_tree)
    full_logp = jax.jit(lambda t: outputs(full_run.models, t))(full_tree)
    ref_logp = jax.jit(lambda t: outputs(full_run.models, t, reference=True))(full_tree)
    np.testing.assert_allclose(full_logp, lora_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref_logp, lora_logp, rtol=1e-5, atol=1e-5)


def test_the_rm_shares_the_policy_base_only_when_trained_on_exactly_it(monkeypatch, tmp_path):
    """One frozen base for all four models (the tiny chain with an adapter RM): only when both
    stages started from the same checkpoint, the policy init merged its adapter, and the RM
    trained nothing but its adapter and head."""
    from rlaif_jax.ppo import init as ppo_init
    from tests.support import init_fn, tiny_reward_model

    # The policy init names the SFT stage directory, the RM its step directory (as the stages
    # write their meta); both resolve to the same step.
    sft_dir = str(tmp_path / "sft")
    sft, other = os.path.join(sft_dir, "checkpoints", "7"), str(tmp_path / "sft13b")
    inits = {"policy": sft_dir, "rm": sft, "rm_other": other, "random": ""}
    steps = {sft_dir: sft, sft: sft, other: other}
    monkeypatch.setattr(ppo_init, "read_meta", lambda step: {"init": inits[step]})
    monkeypatch.setattr(ppo_init, "resolve_checkpoint", lambda init: ("step", steps[init]))
    abstract = jax.eval_shape(init_fn(tiny_reward_model(lora_rank=4)), jax.random.PRNGKey(0))
    merge, adapter_rm = {"init_adapter": "merge"}, {"trainable": "lora/.*|params/reward_head/.*"}

    def decide(policy, policy_config, rm, rm_config):
        return ppo_init.rm_backbone_is_policy_base(policy, policy_config, rm, rm_config, abstract)

    assert decide("policy", merge, "rm", adapter_rm) == (True, "")
    shares, why = decide("policy", merge, "rm_other", adapter_rm)
    assert not shares and "sft13b" in why
    assert not decide("random", merge, "rm", adapter_rm)[0]
    shares, why = decide("policy", {"init_adapter": "continue"}, "rm", adapter_rm)
    assert not shares and "continued" in why
    shares, why = decide("policy", merge, "rm", {"trainable": "lora/.*|params/(reward_head|"
                                                              "projector)/.*"})
    assert not shares and "projector" in why
    shares, why = decide("policy", merge, "rm", {"trainable": "params/(llm|reward_head)/.*"})
    assert not shares and "llm" in why  # the tiny preset's fully fine-tuned RM


def test_a_policy_init_that_continued_its_adapter_is_rebuilt_without_merging_it(
        policy_stage, tmp_path):
    """A stage with `init_adapter='continue'` trained its init's adapter further: PPO rebuilds
    its base WITHOUT that adapter folded in (else it would count twice)."""
    from rlaif_jax.checkpoints.orbax_io import resolve_checkpoint
    from rlaif_jax.engine.model_init import build_model as stage_build_model
    from rlaif_jax.ppo.init import load_keeping_adapter

    config = override(sft_configs.get_config("reverse"), workdir=str(tmp_path), num_steps=2,
                  init=policy_stage, init_adapter="continue", trainable="lora/.*",
                  max_replicated_share=1.0,
                  **{"model.lora.rank": 4, "model.lora.alpha": 8.0, "optim.lr": 3e-2})
    stage = dataclasses.replace(build_sft_stage(config, _mesh()), evaluate=None)
    fresh = {}

    def fresh_state():
        fresh["state"], fresh["frozen"] = stage.fresh_state()
        return fresh["state"], fresh["frozen"]

    run_stage(dataclasses.replace(stage, fresh_state=fresh_state), str(tmp_path / "continued"),
              OPTIONS)
    earlier = read_step_dir(resolve_checkpoint(policy_stage)[1])[0]["lora"]
    assert any(np.any(b) for p, b in jax.tree_util.tree_flatten_with_path(earlier)[0]
               if "lora_b" in optim.path_str(p))  # merging it would change the base
    step = resolve_checkpoint(str(tmp_path / "continued"))[1]
    _, init = stage_build_model(config)
    got = jax.device_get(load_keeping_adapter(step, init, _mesh(), make_rules(), config.seed))
    jax.tree.map(np.testing.assert_array_equal, got["params"],
                 jax.device_get(fresh["frozen"]["params"]))  # the stage's own frozen base
    jax.tree.map(np.testing.assert_array_equal, got["lora"], read_step_dir(step)[0]["lora"])


def test_the_ppo_config_sets_how_to_run_the_checkpoints_models_not_what_they_are(loaded):
    """`config.model` / `config.critic_model` lay their runtime fields (dtype, remat...) over the
    checkpoints' configs; their architecture fields are not read."""
    rm_stage, _, args, run, _ = loaded
    policy_runtime = {"llm": {"remat_policy": "full", "hidden_size": 4096}}
    critic_runtime = {"llm": {"remat_policy": "full", "dtype": "bfloat16", "num_layers": 40},
                      "vision": {"remat_policy": "full"}}
    models = load_actor_critic(*args, policy_runtime=policy_runtime,
                               critic_runtime=critic_runtime).models
    assert models.policy.config.remat_policy == "full"  # the text policy: the llm's fields
    assert models.policy.config.hidden_size == run.models.policy.config.hidden_size
    llm, vision = models.critic.config.llm, models.critic.config.vision
    assert (llm.remat_policy, llm.dtype, vision.remat_policy) == ("full", "bfloat16", "full")
    assert llm.num_layers == rm_stage[0].model.llm.num_layers == 2
    assert run.models.critic.config.llm.remat_policy == "none"  # the checkpoint's own
