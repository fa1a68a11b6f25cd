"""The main job end to end on the `smoke` chain: `launch/main.py --config=configs/ppo.py:smoke`.

Starts from a copy of the session's SFT smoke workdir (the world and the SFT stage), so the job
runs the rest of the chain (policy init, feedback, RM), PPO on the RM, the true-reward control
and the held-out table in one process; a rerun then redoes nothing. The report reads it all.
"""

import json
import os
import re
import shutil

import pytest

from rlaif_jax.eval import context_bound
from tests.support import ROOT, launch, run_module

PPO = os.path.join(ROOT, "configs", "ppo.py") + ":smoke"


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def main_job(smoke_workdir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("main_job") / "work"
    workdir.mkdir()
    for part in ("data", "sft"):  # a private copy: other tests may add stages to the fixture
        shutil.copytree(os.path.join(smoke_workdir, part), workdir / part, symlinks=True)
    args = [f"--config={PPO}", f"--config.workdir={workdir}", "--config.log.progress=false",
            "--config.log.tensorboard=false"]
    first = launch(args, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    second = launch(args, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    return str(workdir), first.stdout, second.stdout


def test_main_job_runs_the_missing_stages_in_order_then_ppo(main_job):
    workdir, out, _ = main_job
    announced = [line for line in out.splitlines() if "running stage" in line]
    assert [line.split("running stage ")[1].split()[0] for line in announced] == [
        "policy_init", "feedback", "rm", "rm_no_context", "rm_oracle"]  # sft was there
    assert "not redoing stage sft" in out
    for stage in ("policy_init", "rm", "rm_no_context", "rm_oracle"):
        assert os.listdir(os.path.join(workdir, stage, "checkpoints"))
    preferences = json.load(open(os.path.join(workdir, "feedback", "preferences.json")))
    assert preferences and all(p["preference_no_context"] in (1, 2) for p in preferences)
    for stage in ("ppo", "ppo_oracle"):
        assert sorted(os.listdir(os.path.join(workdir, stage, "checkpoints")))[-1] == "4"
        records = _metrics(os.path.join(workdir, stage, "metrics.jsonl"))
        iterations = [r["step"] for r in records if "rollout/score_mean" in r]
        assert iterations == [1, 2, 3, 4]
        kl = [r["rollout/kl"] for r in records if "rollout/kl" in r]
        assert all(k >= 0 for k in kl) and kl[0] == pytest.approx(0.0, abs=1e-4)
        evals = [r["step"] for r in records if "eval/exact_match" in r]
        assert evals == [2, 4]
        assert os.path.isfile(os.path.join(workdir, stage, "best.json"))
    # Each part's wall time, as the job printed it; the compiled programs stayed in the workdir.
    times = json.load(open(os.path.join(workdir, "eval", "stage_times.json")))
    assert set(times) == {"policy_init", "feedback", "rm", "rm_no_context", "rm_oracle", "ppo",
                          "ppo_oracle", "eval"}
    assert all(seconds > 0 for seconds in times.values())
    assert re.search(r"\[main\] ppo took \d+ s", out)
    assert os.listdir(os.path.join(workdir, "jax_cache"))
    # The RLAIF run scored with the RM; the control with the scorer (in [0, 1]).
    oracle = [r["rollout/score_mean"] for r in _metrics(
        os.path.join(workdir, "ppo_oracle", "metrics.jsonl")) if "rollout/score_mean" in r]
    assert all(0.0 <= s <= 1.0 for s in oracle)


def test_main_job_prints_the_held_out_table(main_job):
    workdir, out, _ = main_job
    assert "[table] held-out questions" in out
    table = out[out.index("[table] held-out questions"):]
    for row in ("sft", "policy_init", "ppo", "ppo_oracle", "blind"):
        assert f"| {row} |" in table
        result = json.load(open(os.path.join(workdir, "eval", row, "results.json")))
        assert 0.0 <= result["metrics"]["eval/exact_match"] <= 1.0
        assert "synthetic_qa" in result["tasks"]


def test_main_job_runs_the_context_ablation_beside_the_rm(main_job):
    """Three RMs on the same held-out pairs: the judge's labels with context, without, and the
    truth; with the heuristic baselines on those pairs; judged.jsonl holds every judged pair."""
    workdir, out, _ = main_job
    last = {}
    for stage in ("rm", "rm_no_context", "rm_oracle"):
        records = _metrics(os.path.join(workdir, stage, "metrics.jsonl"))
        last[stage] = [r for r in records if "eval/rm_accuracy_truth" in r][-1]
        assert 0.0 <= last[stage]["eval/rm_accuracy_truth"] <= 1.0
        assert 0.0 <= last[stage]["eval/baseline_longer_accuracy_truth"] <= 1.0
    assert len({last[s]["eval/heldout_pairs"] for s in last}) == 1
    assert len({last[s]["eval/baseline_first_accuracy_truth"] for s in last}) == 1
    assert "[table] reward models" in out and "| rm_no_context |" in out
    feedback = _metrics(os.path.join(workdir, "feedback", "metrics.jsonl"))[-1]
    assert "feedback/pairs_time_localised" in feedback
    with open(os.path.join(workdir, "feedback", "judged.jsonl")) as f:
        judged = [json.loads(line) for line in f]
    assert judged and len(judged) == feedback["feedback/judged"]
    assert set(judged[0]) >= {"id", "images", "question_type", "output_1", "output_2",
                              "true_scores", "preference", "confidence", "preference_no_context",
                              "confidence_no_context", "kept"}


def test_context_bound_reads_the_main_jobs_pairs(main_job, tmp_path):
    workdir, _, _ = main_job
    out = str(tmp_path / "bound.json")
    proc = run_module("rlaif_jax.eval.context_bound", [workdir, "--batch_size", "8",
                                                       "--json", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "feedback", "judged.jsonl")) as f:
        judged = [json.loads(line) for line in f]
    readable = [r for r in judged if r["question_type"] in context_bound.READABLE_TYPES
                and r["true_scores"][0] != r["true_scores"][1]]
    with open(out) as f:
        result = json.load(f)
    assert len(result["records"]) == len(readable)
    if readable:
        assert "| all |" in proc.stdout and result["rows"][-1]["type"] == "all"
    else:
        assert result["rows"] == [] and "no decisive pairs" in proc.stdout
    with pytest.raises(SystemExit) as stopped:  # before any model is loaded
        context_bound.main([workdir, "--types", "motion"])
    assert stopped.value.code == 2


def test_rerun_resumes_instead_of_redoing(main_job):
    workdir, first, second = main_job
    assert "running stage" not in second
    for stage in ("sft", "policy_init", "feedback", "rm", "rm_no_context", "rm_oracle"):
        assert f"not redoing stage {stage}" in second
    assert "[ppo] done already" in second and "[ppo_oracle] done already" in second
    # No PPO iteration ran twice; the table came back from the eval files unchanged.
    records = _metrics(os.path.join(workdir, "ppo", "metrics.jsonl"))
    assert [r["step"] for r in records if "rollout/score_mean" in r] == [1, 2, 3, 4]
    assert "[main] eval took" in second  # the table, read back
    table = lambda out: out[out.index("[table] held-out questions"):].split("\n\n")[0]  # noqa
    assert table(second) == table(first)


def test_report_reads_the_main_job(main_job):
    from rlaif_jax.report import build_report

    workdir, _, _ = main_job
    text = open(build_report(workdir)).read()
    for png in ("sft_loss.png", "rm_accuracy.png", "ppo_reward_kl.png"):
        assert os.path.isfile(os.path.join(workdir, png)), png
    assert "`rollout/score_mean`" in text and "`rollout/kl`" in text
    assert "`eval/rm_accuracy_ai`" in text
    assert "| ppo_oracle |" in text and "| blind |" in text  # the controls in the table
    assert "agreement_with_truth" in text


def test_ppo_tree_is_made_of_the_checkpoints_and_scores_as_the_rm(main_job):
    """Policy = policy-init adapter on the SFT base, reference = that same adapter, RM = the RM
    checkpoint; the value head starts at zero; and the RM score PPO computes on device from
    prompt + sampled tokens + suffix equals the RM stage's own scoring of the same text."""
    import jax
    import numpy as np
    import transformers

    from rlaif_jax.checkpoints.orbax_io import read_step_dir
    from rlaif_jax.engine.pretrained import build_stage_model
    from rlaif_jax.data import conversation
    from rlaif_jax.parallel.mesh import make_mesh
    from rlaif_jax.parallel.sharding import make_rules
    from rlaif_jax.ppo.init import load_actor_critic
    from rlaif_jax.ppo.prompts import rm_suffix_ids
    from rlaif_jax.rm.model import reward_model_rows, reward_scores

    workdir, _, _ = main_job
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.join(workdir, "data", "world", "tokenizer"))
    lora = dict(rank=8, alpha=16.0, targets="(q_proj|v_proj)")
    loaded = load_actor_critic(workdir, "stage:policy_init", "stage:rm", mesh, make_rules(),
                               tokenizer, lora)
    tree = jax.device_get(loaded.variables())
    policy_saved = read_step_dir(loaded.policy_step)[0]
    rm_saved = read_step_dir(loaded.rm_step)[0]
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(tree["policy"]["lora"], policy_saved["lora"])
    same(tree["reference"]["lora"], policy_saved["lora"])
    sft_step = os.path.join(workdir, "sft", "checkpoints", max(
        os.listdir(os.path.join(workdir, "sft", "checkpoints")), key=int))
    same(tree["policy"]["params"], read_step_dir(sft_step)[0]["params"])  # SFT: no adapter
    same(tree["rm"]["head"], rm_saved["params"]["reward_head"])
    same(tree["critic"]["params"]["llm"], rm_saved["params"]["llm"])
    assert not loaded.models.critic_shares_base and not loaded.models.rm_has_adapter
    assert all(np.all(x == 0) for x in jax.tree.leaves(tree["value"]["head"]))
    assert all(np.all(x == 0) for p, x in jax.tree_util.tree_flatten_with_path(
        tree["value"]["lora"])[0] if "lora_b" in str(p))

    turn = conversation.video_question("What colour is the square?")
    prompt = conversation.tokenize_prompt(turn, tokenizer)
    row = reward_model_rows([turn], ["it is red"], tokenizer, 256)
    length = int(row["attention_mask"].sum())
    suffix = rm_suffix_ids(tokenizer, turn)
    response = row["input_ids"][0, len(prompt):length - len(suffix)]  # tokens, then the eos
    pad = 3  # left padding of the prompt, right padding of the response
    frames = np.random.default_rng(0).integers(
        0, 255, (1,) + (loaded.models.critic.config.num_frames,) + (
            loaded.models.critic.config.vision.image_size,) * 2 + (3,), dtype=np.uint8)
    batch = {"prompt_ids": np.pad(prompt, (pad, 0))[None],
             "prompt_mask": np.pad(np.ones_like(prompt), (pad, 0))[None],
             "response": np.pad(response, (0, pad))[None],
             "mask": np.pad(np.ones_like(response), (0, pad))[None],
             "has_video": np.ones(1, bool)}
    batch["critic_video_tokens"] = loaded.models.encode_video(tree, frames, critic=True)
    ppo_score = loaded.models.rm_scores(tree, batch, suffix)
    rm_model, _ = build_stage_model(loaded.rm_config, tokenizer, reward_head=True)
    rm_params = dict(tree["critic"]["params"], reward_head=tree["rm"]["head"])
    weight = loaded.models.rm_likelihood_weight
    assert weight == loaded.rm_config["likelihood_weight"] == 1.0  # the tiny preset's term
    rm_score = reward_scores(rm_model, {"params": rm_params}, dict(
        row, frames=frames, has_video=np.ones(1, bool)), weight)
    np.testing.assert_allclose(ppo_score, rm_score, rtol=1e-4, atol=1e-5)


def test_from_pretrained_loads_each_later_stage_of_the_main_job(main_job):
    """The policy init, RM and PPO stage directories load as the models those stages trained:
    adapters merged over the SFT weights they were trained on, the RM with its head, PPO as its
    policy (the adapter PPO trained, not the one it started from)."""
    import jax
    import numpy as np

    import rlaif_jax
    from rlaif_jax.checkpoints.orbax_io import read_step_dir, resolve_checkpoint
    from rlaif_jax.models.lora import LoraConfig, merge_lora

    workdir, _, _ = main_job
    saved = {stage: read_step_dir(resolve_checkpoint(os.path.join(workdir, stage))[1])
             for stage in ("sft", "policy_init", "rm", "ppo")}
    sft = saved["sft"][0]["params"]
    lora = LoraConfig(**saved["policy_init"][1]["lora"])
    assert lora.rank == 64

    def same(loaded, expected, rtol=0.0):  # rtol > 0: merged in another program, float32
        leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(loaded))[0]
        reference = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(expected))[0])
        assert len(leaves) == len(reference)
        for path, value in leaves:
            np.testing.assert_allclose(value, reference[path], rtol=rtol, atol=rtol * 0.1,
                                       err_msg=jax.tree_util.keystr(path))

    policy_model, policy = rlaif_jax.from_pretrained(os.path.join(workdir, "policy_init"))
    assert policy_model.config.llm.lora == lora
    same(policy, merge_lora(sft, saved["policy_init"][0]["lora"], lora), rtol=1e-6)

    rm_model, rm = rlaif_jax.from_pretrained(os.path.join(workdir, "rm"))
    assert rm_model.config.reward_head
    rm_saved = saved["rm"][0]["params"]
    same({k: rm[k] for k in rm_saved}, rm_saved)  # what the RM trained: LLM and head
    same({k: v for k, v in rm.items() if k not in rm_saved},
         {k: v for k, v in sft.items() if k not in rm_saved})  # the rest: the SFT model's

    ppo_model, ppo = rlaif_jax.from_pretrained(os.path.join(workdir, "ppo"))
    assert ppo_model.config == policy_model.config
    adapter = saved["ppo"][0]["policy"]["lora"]
    same(ppo, merge_lora(sft, adapter, lora), rtol=1e-6)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(ppo["llm"]), jax.tree.leaves(jax.device_get(policy["llm"])))]
    assert max(moved) > 0  # PPO's adapter, not the policy init's


def test_agreement_breakdown_rescores_the_rm_as_its_stage_did(main_job):
    """`python -m rlaif_jax.eval.agreement --rm` re-scores the RM's held-out pairs from its
    checkpoint: its totals are the stage's own final evaluation."""
    import pytest

    from rlaif_jax.eval import agreement

    workdir, _, _ = main_job
    rows = agreement.rm_rows(os.path.join(workdir, "rm"))
    final = [m for m in _metrics(os.path.join(workdir, "rm", "metrics.jsonl"))
             if "eval/rm_accuracy_truth" in m][-1]
    assert rows and len(rows) == final["eval/heldout_pairs"]
    for against in ("truth", "ai"):
        accuracy = agreement.breakdown(rows, "type", against=against)["all"][1]
        assert accuracy == pytest.approx(final[f"eval/rm_accuracy_{against}"], abs=1e-6)


@pytest.mark.parametrize("context", ["none", "question"])
def test_the_no_context_rm_is_trained_only_when_the_judge_read_a_context(
        tmp_path, monkeypatch, context):
    import ml_collections

    from rlaif_jax import main_job

    (tmp_path / "feedback").mkdir()
    (tmp_path / "feedback" / "config.json").write_text(json.dumps({"context": context}))
    ran = []
    monkeypatch.setattr(main_job, "stage_done", lambda workdir, stage: False)
    monkeypatch.setattr(main_job, "run_stage", ran.append)
    config = ml_collections.ConfigDict(dict(workdir=str(tmp_path), rm_controls=True))
    main_job.run_missing_stages(config, lambda stage: stage)
    expected = ["sft", "policy_init", "feedback", "rm"] + (
        ["rm_no_context"] if context != "none" else []) + ["rm_oracle"]
    assert ran == expected
