"""Every prompt text of the project, in one place.

Stages import these functions instead of writing their own strings, so that the synthetic world's
judge-training data, the feedback stage, the reward model and the evaluation all speak the same
language.
"""
from __future__ import annotations

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


def join_clip_descriptions(clip_descriptions: list[str]) -> str:
    """The narrative: clip descriptions joined in temporal order, each marked by its place."""
    parts = [f"Clip {i + 1}: {text.strip()}" for i, text in enumerate(clip_descriptions)]
    return " ".join(parts)


def judge_prompt(question: str, answer_1: str, answer_2: str, context: str | None) -> str:
    """The human turn of the context-aware AI judge (the reference never released its own).

    The video itself goes in front as the `<image>` placeholder (added by the conversation
    builder); the judge must reply with one label of `JUDGE_CHOICES`. `context=None` leaves the
    description out (the feedback stage's no-context ablation).
    """
    principles = " ".join(f"({i + 1}) {p}." for i, p in enumerate(JUDGE_PRINCIPLES))
    described = ("" if context is None
                 else f"Here is a detailed description of the video: {context.strip()}\n")
    return (
        described +
        f"Question: {question.strip()}\n"
        f"Answer 1: {answer_1.strip()}\n"
        f"Answer 2: {answer_2.strip()}\n"
        f"Which answer is better? A better answer is {principles} "
        f"Reply with {JUDGE_CHOICES[0]} or {JUDGE_CHOICES[1]} only."
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
