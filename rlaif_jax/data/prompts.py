"""Every prompt text of the project, in one place.

Stages import these functions instead of writing their own strings, so that the synthetic world's
judge-training data, the feedback stage, the reward model and the evaluation all speak the same
language.
"""
from __future__ import annotations

import re

IMAGE_TOKEN = "<image>"

# vicuna_v1, as LLaVA-1.5 and the reference use it.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
TURN_SEPARATOR = " "  # between the system sentence / a question and the next role
END_OF_ANSWER = "</s>"  # closes every assistant turn (the eos token)

# The reference JSON's role names mapped to the template's.
ROLE_NAMES = {"human": USER_ROLE, "gpt": ASSISTANT_ROLE}

# The judge answers with exactly one of these labels (single tokens in the synthetic tokenizer).
JUDGE_CHOICES = ("1", "2")

CONTEXT_QUESTION = "Describe this video in detail."
# Introduces the context in the judge's prompt (and in the context-reading SFT rows).
CONTEXT_LEAD = "Here is a detailed description of the video:"

JUDGE_PRINCIPLES = (
    "accurate and grounded in the video",
    "helpful: it answers the question that was asked",
    "right about time and order: events are placed when and in the order they happen",
    "concise: no repetition and nothing that is not asked",
)

RM_DIMENSIONS = (
    "accurate and grounded in the video",
    "helpful",
    "natural language",
    "concise",
)
RM_SCORE_LEAD = "the quality score of my last response is"


def context_prompt() -> str:
    """The question that asks the policy for a detailed description of a video (or of a clip)."""
    return CONTEXT_QUESTION


# Asked of one clip for the `question` context: what the clip shows about the prompt's question.
CLIP_QUESTION_LEAD = "For this clip only, in a few words:"


def clip_question(question: str) -> str:
    """The question asked of each clip for a question-conditioned context: the prompt's
    question, led by the request to answer briefly for that clip alone."""
    return f"{CLIP_QUESTION_LEAD} {question.strip()}"


def join_clip_descriptions(clip_descriptions: list[str],
                           clip_numbers: list[int] | None = None) -> str:
    """The narrative: clip descriptions joined in temporal order, each marked by its place
    ("Clip 1: ... Clip 2: ..."); `clip_numbers` (1-based) where only some clips are given."""
    numbers = clip_numbers or range(1, len(clip_descriptions) + 1)
    return " ".join(f"Clip {n}: {_sentence(text)}" for n, text in zip(numbers, clip_descriptions))


def numbered_clip_descriptions(context: str) -> list[tuple[int, str]]:
    """(clip number, text) of each slot of a joined context, in order."""
    return [(int(m.group(1)), m.group(2).strip())
            for m in re.finditer(r"(?:^| )Clip (\d+): (.*?)(?= Clip \d+: |$)", context.strip())]


# Time phrases by which a question names a part of the video, and the clip each part is (a
# fraction of the way through the clips: 0 the first, 1 the last).
CLIP_TIME_PHRASES = (("at the start", 0.0), ("at the beginning", 0.0), ("in the middle", 0.5),
                     ("at the end", 1.0))


def clip_named_by(question: str, num_clips: int) -> int | None:
    """The clip (0-based) that a question's time phrase names ("What colour is the circle at
    the end?" -> the last clip); None when it names none, or more than one part."""
    lowered = question.lower()
    named = {round(where * (num_clips - 1)) for phrase, where in CLIP_TIME_PHRASES
             if phrase in lowered}
    return named.pop() if len(named) == 1 else None


def split_clip_descriptions(context: str) -> list[str]:
    """The clip texts of a joined context, in order (the inverse of join_clip_descriptions, up
    to the full stop it adds)."""
    return [text for _, text in numbered_clip_descriptions(context)]


def _sentence(text: str) -> str:
    """A clip's text ending in a full stop, so that short clip answers stay apart when joined."""
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


# How the judge is read: 'label' (it replies with one of JUDGE_CHOICES, read from its next-token
# probabilities), 'restate' (it replies with the better answer itself, read where the two answers
# first differ) or 'likelihood' (each answer's mean log-probability per token when the policy,
# given the video, the context and the question, is asked to answer: the answer it would more
# confidently give itself is the better one).
PAIRWISE_REPLIES = ("label", "restate")  # the judge reads both answers in one prompt
JUDGE_REPLIES = PAIRWISE_REPLIES + ("likelihood",)


def question_with_context(question: str, context: str | None) -> str:
    """A question preceded by a context of the video (the clip narrative), in the judge's words;
    the question alone when there is no context."""
    if context is None:
        return question.strip()
    return f"{CONTEXT_LEAD} {context.strip()}\nQuestion: {question.strip()}"


def judge_prompt(question: str, answer_1: str, answer_2: str, context: str | None,
                 reply: str = "label") -> str:
    """The human turn of the context-aware AI judge (the reference never released its own).

    The video itself goes in front as the `<image>` placeholder (added by the conversation
    builder); the judge must reply with one label of `JUDGE_CHOICES` (`reply='label'`) or with
    the better answer (`reply='restate'`). `context=None` leaves the description out (the
    feedback stage's no-context ablation).
    """
    if reply not in JUDGE_REPLIES:
        raise ValueError(f"reply={reply!r}: expected one of {JUDGE_REPLIES}")
    if reply == "likelihood":
        raise ValueError("the likelihood judge reads answers alone: use question_with_context")
    instruction = (f"Reply with {JUDGE_CHOICES[0]} or {JUDGE_CHOICES[1]} only." if reply == "label"
                   else "Reply with the better answer.")
    principles = " ".join(f"({i + 1}) {p}." for i, p in enumerate(JUDGE_PRINCIPLES))
    described = "" if context is None else f"{CONTEXT_LEAD} {context.strip()}\n"
    return (
        described +
        f"Question: {question.strip()}\n"
        f"Answer 1: {answer_1.strip()}\n"
        f"Answer 2: {answer_2.strip()}\n"
        f"Which answer is better? A better answer is {principles} " + instruction
    )


def rm_evaluation_prompt() -> tuple[str, str]:
    """The fixed (user question, assistant prefix) appended after a response for the reward model.

    The score is read at the last token of the assistant prefix, so the prefix has no closing eos.
    """
    dimensions = ", ".join(f"({i + 1}) {d}" for i, d in enumerate(RM_DIMENSIONS))
    user = (
        "Please evaluate the quality of your last response. There are several dimensions you "
        f"should consider in your evaluation: {dimensions}."
    )
    assistant = f"Following your definitions, {RM_SCORE_LEAD}"
    return user, assistant


# ---------------------------------------------------------------------------------------------
# The evaluation judge (rlaif_jax/eval/): our own words, the reference's scoring scheme.
#
# Video-ChatGPT's evaluation (which VLM-RLAIF reports) asks a chat LLM to grade each prediction
# against the ground-truth answer:
# - zero-shot QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA): does the prediction match the answer
#   (yes / no), and how well, as an integer 0-5; the reply is a Python dict string
#   `{'pred': 'yes', 'score': 4}`. Accuracy is the share of "yes", the score is the mean.
# - the benchmark: one 0-5 score per axis, reply `{'score': 3}`. Correctness, detail and context
#   are judged on the generic questions, temporal on the temporal ones, consistency on pairs of
#   paraphrased questions (Q1, Q2) and their two predictions.
# Each prompt is a (system, user) pair of messages.

QA_AXIS = "qa"
BENCHMARK_AXES = ("correctness", "detail", "context", "temporal", "consistency")
AXES = (QA_AXIS,) + BENCHMARK_AXES
SCORE_MAX = 5

_REPLY_SCORE = (
    "Reply with nothing but a Python dictionary string holding one key, 'score', whose value is "
    f"an integer from 0 to {SCORE_MAX} ({SCORE_MAX} is best). For example: {{'score': 3}}. "
    "No explanation, no other text.")

_QA_SYSTEM = (
    "You grade answers to questions about videos. You are given a question, the correct answer "
    "and a predicted answer. Decide whether the prediction means the same as the correct answer. "
    "Judge the meaning, not the wording: synonyms and paraphrases count as a match; a prediction "
    "that contradicts the correct answer, or leaves it out, does not.")

_QA_USER = (
    "Grade this question-answer pair about a video.\n"
    "Question: {question}\n"
    "Correct answer: {answer}\n"
    "Predicted answer: {prediction}\n"
    "Reply with nothing but a Python dictionary string with two keys: 'pred', which is 'yes' if "
    "the prediction matches the correct answer and 'no' otherwise, and 'score', an integer from "
    f"0 to {SCORE_MAX} saying how well it matches ({SCORE_MAX} is a perfect match). For example: "
    "{{'pred': 'yes', 'score': 4}}. No explanation, no other text.")

_AXIS_SYSTEM = {
    "correctness": (
        "You grade the factual accuracy of answers about videos. Compare the predicted answer "
        "with the correct answer: every statement in the prediction should agree with what the "
        "correct answer says happens in the video. Statements that contradict it, or invent "
        "things it does not support, lower the score."),
    "detail": (
        "You grade how complete and specific answers about videos are. Compare the predicted "
        "answer with the correct answer: a good prediction covers the main points of the correct "
        "answer and gives specific details rather than vague, generic statements."),
    "context": (
        "You grade how well answers about videos fit the video's context. Compare the predicted "
        "answer with the correct answer: a good prediction stays on the subject of the video and "
        "of the question, and its content is in line with the correct answer; off-topic or "
        "irrelevant content lowers the score."),
    "temporal": (
        "You grade how well answers about videos get time right. Compare the predicted answer "
        "with the correct answer: a good prediction puts events in the right order and at the "
        "right moments; wrong order or timing lowers the score."),
    "consistency": (
        "You grade whether a model answers consistently. The same question was asked twice in "
        "different words, and the model answered each. A good pair of predictions agrees with "
        "each other and with the correct answer; predictions that contradict each other, or the "
        "correct answer, lower the score."),
}

_AXIS_USER = (
    "Grade this answer about a video.\n"
    "Question: {question}\n"
    "Correct answer: {answer}\n"
    "Predicted answer: {prediction}\n")

_CONSISTENCY_USER = (
    "Grade these two answers about a video.\n"
    "Question 1: {question}\n"
    "Question 2: {question_2}\n"
    "Correct answer: {answer}\n"
    "Predicted answer to question 1: {prediction}\n"
    "Predicted answer to question 2: {prediction_2}\n")


def judge_messages(axis: str, question: str, answer: str, prediction: str,
                   question_2: str = "", prediction_2: str = "") -> list[dict]:
    """The chat messages ([system, user]) that ask the judge to grade one prediction on `axis`."""
    fields = dict(question=question.strip(), answer=answer.strip(),
                  prediction=prediction.strip(), question_2=question_2.strip(),
                  prediction_2=prediction_2.strip())
    if axis == QA_AXIS:
        system, user = _QA_SYSTEM, _QA_USER.format(**fields)
    elif axis == "consistency":
        system, user = _AXIS_SYSTEM[axis], _CONSISTENCY_USER.format(**fields) + _REPLY_SCORE
    elif axis in _AXIS_SYSTEM:
        system, user = _AXIS_SYSTEM[axis], _AXIS_USER.format(**fields) + _REPLY_SCORE
    else:
        raise ValueError(f"unknown judge axis {axis!r}; expected one of {list(AXES)}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def reply_prefix(axis: str, pred: str | None = None) -> str:
    """The start of the judge's reply, up to the value it must give next.

    A local model judge is fed this after the prompt and the value is read from its next-token
    probabilities: `{'pred': '` (then yes / no) for QA, and `{'score': ` otherwise, or
    `{'pred': 'yes', 'score': ` once the QA verdict is known.
    """
    if axis == QA_AXIS:
        return "{'pred': '" if pred is None else f"{{'pred': '{pred}', 'score': "
    return "{'score': "
