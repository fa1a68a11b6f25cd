"""The evaluation on the synthetic world: the scorer as judge, and a real model end to end."""

import json

import pytest

from configs import eval as eval_config
from rlaif_jax.data.synthetic.generate import generate_world
from rlaif_jax.eval import tasks as tasks_lib
from rlaif_jax.eval.run import run_eval
from rlaif_jax.eval.synthetic_judge import SyntheticJudge
from tests.support import save_tiny_hf_llama


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("world")
    generate_world(str(directory), num_train=2, num_eval=3, frames=8, size=32, progress=False)
    return directory


def _judge_all(judge, task, items, answers_of):
    tasks = [t for item in items for t in tasks_lib.judge_tasks(task, item, answers_of(item))]
    return list(judge.judge(tasks))


def test_scorer_judge_gives_the_truth_full_marks_and_wrong_answers_less(world):
    judge = SyntheticJudge(str(world))
    qa, _ = tasks_lib.load_items("synthetic_qa", str(world / "eval_qa.json"))
    right = _judge_all(judge, "synthetic_qa", qa, lambda item: [item.answer])
    assert all(j.ok and j.pred == "yes" and j.score == 5 for j in right)
    wrong = _judge_all(judge, "synthetic_qa", qa, lambda item: ["I do not know"])
    assert all(j.ok and j.pred == "no" and j.score == 0 for j in wrong)
    generic, _ = tasks_lib.load_items("generic", str(world / "eval_generic.json"))
    truthful = _judge_all(judge, "generic", generic, lambda item: [item.answer])
    assert {j.axis for j in truthful} == {"correctness", "detail", "context"}
    assert all(j.score == 5 for j in truthful)
    partial = _judge_all(judge, "generic", generic,
                         lambda item: [item.answer.split(".")[0] + "."])  # the first sentence
    assert all(j.ok for j in partial)
    assert any(j.axis == "detail" and j.score < 5 for j in partial)
    consistency, _ = tasks_lib.load_items("consistency", str(world / "eval_consistency.json"))
    one_wrong = _judge_all(judge, "consistency", consistency,
                           lambda item: [item.answer, "I do not know"])
    both_right = _judge_all(judge, "consistency", consistency,
                            lambda item: [item.answer, item.answer])
    assert all(j.score == 0 for j in one_wrong) and all(j.score == 5 for j in both_right)


def test_exact_match_is_also_reported_per_question_type(world):
    import numpy as np

    from rlaif_jax.data.synthetic import load_truth
    from rlaif_jax.data.synthetic.text import parse_question
    from rlaif_jax.eval.synthetic_qa import EvalItem, score_items

    records = json.load(open(world / "eval_qa.json"))
    empty = np.zeros((1,), np.int32)
    items = [EvalItem(r["video_name"], r["question"], r["answer"], parse_question(r["question"]),
                      empty, empty, 0, empty) for r in records]
    # Right on every type but the counts, which are all answered wrong.
    answers = ["I do not know" if i.spec["type"] == "count" else i.answer for i in items]
    metrics = score_items(items, answers, load_truth(str(world)), "eval/")
    kinds = {i.spec["type"] for i in items}
    assert {f"eval/exact_match/{kind}" for kind in kinds} <= set(metrics)
    assert metrics["eval/exact_match/count"] == 0.0
    assert all(metrics[f"eval/exact_match/{kind}"] == 1.0 for kind in kinds - {"count"})
    counts = sum(i.spec["type"] == "count" for i in items)
    assert metrics["eval/exact_match"] == pytest.approx(1 - counts / len(items))
    assert metrics["eval/n_qa"] == len(items) and "eval/n_describe" not in metrics
    described = [EvalItem(items[0].video_name, "Describe this video in detail.", "",
                          {"type": "describe"}, empty, empty, 0, empty)] * 3
    metrics = score_items(described, ["A red square."] * 3, load_truth(str(world)), "eval/")
    assert metrics["eval/n_describe"] == 3 and "eval/n_qa" not in metrics


def test_tiny_model_end_to_end_on_the_world(world, tmp_path, monkeypatch):
    """A random text-only LLaMA, blind (no videos), answers every eval file of the world; the
    scorer grades it; a rerun loads nothing and asks nothing."""
    model_dir = tmp_path / "model"
    save_tiny_hf_llama(str(model_dir), seed=3, vocab_size=700, num_hidden_layers=2)
    c = eval_config.get_config()
    c.init = str(model_dir)
    c.tokenizer = str(world / "tokenizer")
    c.world = str(world)
    c.workdir = str(tmp_path / "workdir")
    c.blind = True
    c.sampling.max_new_tokens = 6
    results = run_eval(c)
    out = tmp_path / "workdir" / "eval" / "model"
    assert results["output_dir"] == str(out)
    assert set(results["tasks"]) == {"synthetic_qa", "generic", "temporal", "consistency"}
    counts = json.loads((world / "manifest.json").read_text())["counts"]
    qa = results["tasks"]["synthetic_qa"]
    assert qa["items"] == counts["eval_qa"] == qa["answered"] == qa["judged"]
    for task in ("generic", "temporal", "consistency"):
        entry = results["tasks"][task]
        assert entry["answered"] == entry["items"] == counts[f"eval_{task}"]
        assert entry["judged"] == entry["judgements_expected"] == entry["items"] * len(
            tasks_lib.TASK_AXES[task])
    assert 0 <= qa["accuracy"] <= 100
    assert set(results["axes"]) == {"correctness", "detail", "context", "temporal", "consistency"}
    predictions = json.loads((out / "synthetic_qa" / "predictions.json").read_text())
    assert all(isinstance(p["pred"], str) for p in predictions)
    # Rerun: the model is not loaded again and the same results come back.
    from rlaif_jax.inference import stage as infer

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although every answer was saved")

    monkeypatch.setattr(infer, "QuestionAnswerer", no_loading)
    assert run_eval(c)["tasks"] == results["tasks"]


def test_video_llm_reads_the_world_videos(world, tmp_path):
    """A tiny random video LLM answers with the world's videos (8 frames each), not blind; one
    unreadable video is skipped and counted, never fatal."""
    import jax
    import jax.numpy as jnp
    import transformers

    import rlaif_jax
    from rlaif_jax.data.conversation import image_token_id
    from rlaif_jax.models.clip_vision import ClipVisionConfig
    from rlaif_jax.models.llama import LlamaConfig
    from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    image_id = image_token_id(tokenizer)
    config = VideoLLMConfig(
        vision=ClipVisionConfig(image_size=28, patch_size=14, hidden_size=32,
                                intermediate_size=64, num_layers=1, num_heads=2),
        llm=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, max_position_embeddings=512),
        num_frames=8, image_token_id=image_id)
    model = VideoLLM(config)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32),
                                    frames=jnp.zeros((1, 8, 28, 28, 3), jnp.uint8),
                                    has_video=jnp.ones((1,), bool))
    rlaif_jax.save_pretrained(model, variables["params"], str(tmp_path / "llava"),
                              layout="original")
    # One item points at a video that does not exist.
    generic = json.loads((world / "eval_generic.json").read_text())
    generic.append({"video_name": "missing_video", "Q": generic[0]["Q"], "A": generic[0]["A"]})
    (tmp_path / "generic.json").write_text(json.dumps(generic))
    c = eval_config.get_config()
    c.init, c.tokenizer, c.world = str(tmp_path / "llava"), str(world / "tokenizer"), str(world)
    c.tasks.generic = str(tmp_path / "generic.json")
    c.output_dir = str(tmp_path / "out")
    c.sampling.max_new_tokens = 4
    results = run_eval(c)
    entry = results["tasks"]["generic"]
    assert entry["items"] == len(generic) and entry["answered"] == len(generic) - 1
    assert entry["answer_errors"] == {"video_missing": 1}
    assert entry["judged"] == 3 * (len(generic) - 1)
