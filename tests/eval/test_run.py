"""The evaluation runner: resumable after a crash, reference formats, counted failures."""

import json

import pytest

from configs import eval as eval_config
from rlaif_jax.eval.http_judge import HttpJudge
from rlaif_jax.eval.run import run_eval
from tests.eval.chat_server import ChatServer


class Crash(RuntimeError):
    pass


class CountingAnswerer:
    """Stands in for the model: answers "ans-<id> ..." in batches of 4, counting what it is
    asked; raises after `crash_after` saved batches (the crash a preemption would cause)."""

    has_vision = True

    def __init__(self, crash_after=None):
        self.asked, self.crash_after, self.batches = [], crash_after, 0

    def answer(self, items, on_done=None, desc=""):
        records = []
        for start in range(0, len(items), 4):
            chunk = []
            for item in items[start:start + 4]:
                self.asked.append(item["id"])
                marker = item["id"].replace("/", "_").replace("#", "_")
                chunk.append({"id": item["id"], "question": item["question"],
                              "answer": f"ans-{marker} it is red"})
            on_done(chunk)
            records += chunk
            self.batches += 1
            if self.crash_after is not None and self.batches >= self.crash_after:
                raise Crash("injected crash while answering")
        return records, {}


class RecordingJudge:
    """Delegates to a judge, recording the keys of the tasks it is asked about."""

    def __init__(self, inner):
        self.inner, self.name, self.asked = inner, inner.name, []

    def judge(self, tasks):
        tasks = list(tasks)
        self.asked += [t.key for t in tasks]
        return self.inner.judge(tasks)


def _saved_judgement_keys(out):
    keys = []
    for path in out.glob("*/judgements.jsonl"):
        keys += [f"{r['item_id']}|{r['axis']}" for r in map(json.loads, path.read_text().splitlines())]
    return keys


class CrashingJudge:
    """Delegates to a judge and raises after `crash_after` judgements were handed out."""

    def __init__(self, inner, crash_after):
        self.inner, self.crash_after, self.name = inner, crash_after, inner.name

    def judge(self, tasks):
        for count, judgement in enumerate(self.inner.judge(tasks), start=1):
            yield judgement
            if count >= self.crash_after:
                raise Crash("injected crash while judging")


def _write_tasks(root):
    qa = [{"video_name": f"v{i}", "question_id": f"q{i}", "question": f"what colour is {i}",
           "answer": "red"} for i in range(9)]
    qa.append({"video_name": "v9", "question": "no id", "answer": "red"})  # skipped and counted
    generic = [{"video_name": f"g{i}", "Q": "describe the video", "A": "a red circle"}
               for i in range(3)]
    consistency = [{"video_name": f"c{i}", "Q1": "what colour", "Q2": "which colour",
                    "A": "red"} for i in range(2)]
    paths = {}
    for name, items in [("msvd_qa", qa), ("generic", generic), ("consistency", consistency)]:
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(items))
    return paths


def _config(tmp_path, paths, server):
    c = eval_config.get_config("videochatgpt")
    c.init = str(tmp_path / "never-loaded-model")  # the fake answerer stands in for it
    c.output_dir = str(tmp_path / "out")
    for task, path in paths.items():
        setattr(c.tasks, task, str(path))
    c.judge.base_url = server.base_url
    c.judge.api_key_env = ""
    c.judge.backoff_s = 0.01
    c.judge.concurrency = 3
    return c


def _http(c):
    j = c.judge
    return HttpJudge(base_url=j.base_url, model=j.model, api_key_env="", concurrency=3,
                     backoff_s=0.01, max_retries=2, timeout_s=5)


def test_crash_then_rerun_asks_nothing_twice(tmp_path):
    paths = _write_tasks(tmp_path)
    questions = 9 + 3 + 2 * 2  # qa + generic + consistency (two questions each)
    judgements = 9 + 3 * 3 + 2  # qa + generic x (correctness, detail, context) + consistency
    with ChatServer() as server:
        c = _config(tmp_path, paths, server)
        # 1. Crash while answering, after two batches were saved.
        first = CountingAnswerer(crash_after=2)
        with pytest.raises(Crash):
            run_eval(c, answerer=first, judge=_http(c))
        assert len(first.asked) == 8
        assert sum(server.counts.values()) == 0
        # A torn line, as a crash in the middle of a write leaves it.
        with open(tmp_path / "out" / "msvd_qa" / "answers.jsonl", "a") as f:
            f.write('{"key": "q8", "answ')
        # 2. The same command: the rest is answered; then a crash while judging.
        second = CountingAnswerer()
        with pytest.raises(Crash):
            run_eval(c, answerer=second, judge=CrashingJudge(_http(c), crash_after=7))
        assert sorted(first.asked + second.asked) == sorted(set(first.asked + second.asked))
        assert len(first.asked) + len(second.asked) == questions
        saved = _saved_judgement_keys(tmp_path / "out")
        assert 7 <= len(saved) < judgements and len(set(saved)) == len(saved)
        # 3. Again, with no answerer at all: the model is never loaded (init does not exist),
        #    and the judge is asked only for what was not saved (the crash lost the judgements
        #    in flight, which are asked again).
        third = RecordingJudge(_http(c))
        results = run_eval(c, judge=third)
        assert not set(third.asked) & set(saved)
        assert len(third.asked) + len(saved) == judgements
        assert sorted(_saved_judgement_keys(tmp_path / "out")) == sorted(saved + third.asked)
        # 4. Once more: nothing to do at all.
        requests = sum(server.counts.values())
        fourth = RecordingJudge(_http(c))
        again = run_eval(c, judge=fourth)
        assert fourth.asked == [] and sum(server.counts.values()) == requests
        assert again["tasks"] == results["tasks"]

    qa = results["tasks"]["msvd_qa"]
    assert qa["items"] == 9 and qa["answered"] == 9 and qa["judged"] == 9
    assert qa["file_items_skipped"] == {"no_question_id": 1}
    assert qa["accuracy"] == 100.0 and qa["score"] == 4.0
    assert results["axes"] == {"correctness": 4.0, "detail": 4.0, "context": 4.0,
                               "consistency": 4.0}
    out = tmp_path / "out"
    predictions = json.loads((out / "msvd_qa" / "predictions.json").read_text())
    assert predictions[0] == {"id": "q0", "question": "what colour is 0", "answer": "red",
                              "pred": "ans-msvd_qa_q0 it is red"}
    consistency = json.loads((out / "consistency" / "predictions.json").read_text())
    assert set(consistency[0]) == {"video_name", "Q1", "Q2", "A", "pred1", "pred2", "id"}
    assert consistency[0]["pred2"] == "ans-consistency_c0_0_q2 it is red"
    saved = json.loads((out / "results.json").read_text())
    assert saved["axes"] == results["axes"]
    markdown = (out / "results.md").read_text()
    assert "| model | correctness | detail | context | consistency | MSVD-QA acc / score |" \
        in markdown
    assert "| never-loaded-model | 4.00 | 4.00 | 4.00 | 4.00 | 100.0 / 4.00 |" in markdown


def test_judge_failures_are_counted_and_transport_failures_retried_by_a_rerun(tmp_path):
    paths = _write_tasks(tmp_path)
    del paths["generic"], paths["consistency"]
    scripts = {"ans-msvd_qa_q0": [("ok", "{'pred': 'no', 'score': 'one'}")],
               "ans-msvd_qa_q1": [("ok", "I am not sure.")],
               "ans-msvd_qa_q2": [("status", 503, None)] * 3 + [("ok", "{'pred': 'yes', 'score': 5}")]}
    with ChatServer(scripts) as server:
        c = _config(tmp_path, paths, server)
        results = run_eval(c, answerer=CountingAnswerer(), judge=_http(c))
        qa = results["tasks"]["msvd_qa"]
        assert qa["judge_failures"] == {"missing_score": 1}
        assert qa["judge_not_reached"] == {"http_503": 1}
        assert qa["judged"] == 7 and qa["judgements_expected"] == 9
        assert qa["accuracy"] == pytest.approx(100 * 6 / 7)
        # The rerun asks again only for the one lost in transport (now answered).
        before = dict(server.counts)
        results = run_eval(c, judge=_http(c))
        asked = {k: server.counts[k] - before.get(k, 0) for k in server.counts}
        assert {k: v for k, v in asked.items() if v} == {"ans-msvd_qa_q2": 1}
    assert results["tasks"]["msvd_qa"]["judged"] == 8
    assert results["tasks"]["msvd_qa"]["judge_not_reached"] == {}


def test_bad_setups_stop_at_start(tmp_path):
    paths = _write_tasks(tmp_path)
    with ChatServer() as server:
        c = _config(tmp_path, paths, server)
        text_only = CountingAnswerer()
        text_only.has_vision = False
        with pytest.raises(ValueError, match="text-only model: set config.blind=True"):
            run_eval(c, answerer=text_only, judge=_http(c))
        c.sampling.temperature = 0.7  # answers saved above were made at 0.2
        with pytest.raises(ValueError, match=r"other settings \(\['sampling'\]\)"):
            run_eval(c, answerer=CountingAnswerer(), judge=_http(c))
        c = _config(tmp_path, paths, server)
        c.tasks.msvd_qa = str(tmp_path / "missing.json")
        with pytest.raises(FileNotFoundError, match="config.tasks.msvd_qa"):
            run_eval(c)
        c = _config(tmp_path, {}, server)
        with pytest.raises(ValueError, match="nothing to evaluate"):
            run_eval(c)
        c.judge.kind = "gpt"
        with pytest.raises(ValueError, match="config.judge.kind='gpt'"):
            run_eval(c)


def test_config_defaults_follow_spec():
    c = eval_config.get_config("videochatgpt")
    assert (c.num_frames, c.sampling.temperature, c.sampling.max_new_tokens) == (50, 0.2, 512)
    assert c.stage == "eval" and c.judge.kind == "http"
    default = eval_config.get_config()
    assert default.num_frames == 0 and default.judge.kind == "synthetic"
    with pytest.raises(ValueError, match="unknown eval preset"):
        eval_config.get_config("gpt4")
