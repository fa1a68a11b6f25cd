"""The scorer: grades any free-text answer against a video's truth.

One function, `score_answer(truth, question, answer)`, serves the ground-truth preference, the
held-out accuracy and the oracle controls. A short question is right or wrong: the answer must
name the true value and no other of its kind. A description is read clause by clause into claims
(a shape's colour, motion, appearance, colour change, the count, when events happen and in which
order) and graded on three axes:

- correctness: the fraction of its claims that are true (hallucinated shapes are false claims),
- detail: the fraction of the video's facts it states correctly,
- temporal: the fraction of its time and order claims that are true, times the fraction of the
  video's events it mentions (None when the video has no events and the answer claims none).
"""
from __future__ import annotations

import dataclasses
import re

from rlaif_jax.data.synthetic import text as synthetic_text
from rlaif_jax.data.synthetic import world

_WORD = re.compile(r"[a-z]+|\d+")
_CLAUSE_BREAK = re.compile(r"[.!?;,\n]+|\band\b|\bthen\b")
SHAPE_WORDS = {**{s: s for s in world.SHAPES}, **{s + "s": s for s in world.SHAPES}}
COLOUR_WORDS = {c: c for c in world.COLOURS}
DIRECTION_WORDS = {"left": "left", "right": "right", "up": "up", "upward": "up",
                   "upwards": "up", "down": "down", "downward": "down", "downwards": "down"}
STILL_WORDS = {"still", "static", "stationary", "motionless"}
NEGATIONS = {"not", "doesn", "didn", "never", "no"}
MOVE_WORDS = {"move", "moves", "moving", "moved"}
APPEAR_WORDS = {"appear", "appears", "appeared", "appearing", "emerges", "emerged"}
CHANGE_WORDS = {"change", "changes", "changed", "changing", "turn", "turns", "turned",
                "becomes", "became"}
TIME_WORDS = {"start": "start", "beginning": "start", "middle": "middle", "end": "end"}
NUMBERS = {**{w: i for i, w in enumerate(world.NUMBER_WORDS)},
           **{str(i): i for i in range(len(world.NUMBER_WORDS))}}
GENERIC_SHAPE_WORDS = {"shape", "shapes", "object", "objects"}


@dataclasses.dataclass
class Score:
    correctness: float
    detail: float | None
    temporal: float | None
    score: float  # mean of the axes that apply
    correct: bool  # right answer (short) or a description without a single error or omission


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("n't", " not"))


def _motions(tokens: list[str]) -> set[str]:
    found = {DIRECTION_WORDS[t] for t in tokens if t in DIRECTION_WORDS}
    negated_move = any(t in NEGATIONS for t in tokens) and any(t in MOVE_WORDS for t in tokens)
    if negated_move or STILL_WORDS & set(tokens) or {"stays", "stay", "remains"} & set(tokens):
        found.add("still")
    return found


def _kinds(tokens: list[str], table: dict) -> list:
    """Values of `table` named in the tokens, in order, without repeats."""
    seen = []
    for t in tokens:
        if t in table and table[t] not in seen:
            seen.append(table[t])
    return seen


# ----------------------------------------------------------------------------- short answers

def named_colours(answer: str) -> list[str]:
    """The colours an answer names, in order, without repeats (right iff exactly the true one)."""
    return _kinds(words(answer), COLOUR_WORDS)


def named_times(answer: str) -> list[str]:
    """The parts of the video (start, middle, end) an answer names, in order, without repeats."""
    return _kinds(words(answer), TIME_WORDS)


def _grade_short(truth: dict, spec: dict, answer: str) -> bool:
    tokens = words(answer)
    kind = spec["type"]
    obj = world.find_object(truth, spec.get("shape", ""))
    if kind in ("colour", "colour_start", "colour_end"):
        return _kinds(tokens, COLOUR_WORDS) == [synthetic_text.true_answer(truth, spec)]
    if kind == "motion":
        return _motions(tokens) == {obj["motion"]}
    if kind == "count":
        return set(_kinds(tokens, NUMBERS)) == {len(truth["objects"])}
    if kind == "shape_of_colour":
        return _kinds(tokens, SHAPE_WORDS) == [synthetic_text.true_answer(truth, spec)[4:]]
    if kind in ("appear_when", "change_when"):
        frame = obj["appear_frame"] if kind == "appear_when" else obj["change_frame"]
        return named_times(answer) == [world.time_bucket(frame, truth["num_frames"])]
    if kind == "first_event":
        events = _events_in_order(truth, [tokens])
        first = truth["events"][0]
        return bool(events) and (events[0]["shape"], events[0]["type"]) == \
            (first["shape"], first["type"])
    if kind == "before_after":
        return set(tokens) & {"before", "after"} == {synthetic_text.true_answer(truth, spec)}
    raise ValueError(f"not a short question type: {kind!r}")


def _events_in_order(truth: dict, clauses: list[list[str]]) -> list[dict]:
    """Event claims (shape, type) in the order the text puts them; unknown types are guessed
    from the truth (the shape's only event), for answers like "the circle"."""
    found = []
    for tokens in clauses:
        for shape in _kinds(tokens, SHAPE_WORDS):
            if APPEAR_WORDS & set(tokens):
                kind = "appears"
            elif CHANGE_WORDS & set(tokens):
                kind = "changes"
            else:
                own = [e["type"] for e in truth["events"] if e["shape"] == shape]
                kind = own[0] if len(own) == 1 else None
            found.append({"shape": shape, "type": kind})
    return found


# ----------------------------------------------------------------------------- descriptions

def _clauses(answer: str) -> list[tuple[str | None, list[str]]]:
    """(shape, tokens) per clause; a clause naming no shape continues the previous one's."""
    clauses, current = [], None
    for piece in _CLAUSE_BREAK.split(answer.lower().replace("n't", " not")):
        tokens = words(piece)
        if not tokens:
            continue
        positions = [i for i, t in enumerate(tokens) if t in SHAPE_WORDS]
        if not positions:
            clauses.append((current, tokens))
            continue
        # Several shapes in one clause: each takes the words up to the next shape's.
        bounds = [0] + positions[1:] + [len(tokens)]
        for k, position in enumerate(positions):
            current = SHAPE_WORDS[tokens[position]]
            clauses.append((current, tokens[bounds[k]:bounds[k + 1]]))
    return clauses


def _grade_description(truth: dict, answer: str) -> Score:
    num_frames = truth["num_frames"]
    claims: list[bool] = []
    temporal_claims: list[bool] = []
    covered: set[tuple] = set()
    mentioned_events: list[dict] = []
    for shape, tokens in _clauses(answer):
        token_set = set(tokens)
        numbers = _kinds(tokens, NUMBERS)
        if numbers and GENERIC_SHAPE_WORDS & token_set:  # "there are three shapes"
            right = numbers == [len(truth["objects"])]
            claims.append(right)
            covered |= {("count",)} if right else set()
            continue
        if shape is None:
            continue
        obj = world.find_object(truth, shape)
        if obj is None:  # a shape that is not in the video
            claims.append(False)
            continue
        colours = _kinds(tokens, COLOUR_WORDS)
        times = _kinds(tokens, TIME_WORDS)
        if CHANGE_WORDS & token_set:
            event = next((e for e in truth["events"]
                          if e["shape"] == shape and e["type"] == "changes"), None)
            right = event is not None and (
                colours in ([event["to"]], [event["from"], event["to"]]) or not colours)
            claims.append(right)
            if right:
                covered.add(("changes", shape))
                mentioned_events.append(event)
                temporal_claims.extend(t == event["time"] for t in times)
        elif APPEAR_WORDS & token_set:
            event = next((e for e in truth["events"]
                          if e["shape"] == shape and e["type"] == "appears"), None)
            claims.append(event is not None)
            if event is not None:
                covered.add(("appears", shape))
                mentioned_events.append(event)
                temporal_claims.extend(t == event["time"] for t in times)
                appear_colour = world.colour_at(obj, obj["appear_frame"])
                for colour in colours:
                    claims.append(colour == appear_colour)
                    covered |= {("colour", shape)} if colour == appear_colour else set()
        else:
            for colour in colours:
                if times == ["start"]:
                    right = colour == world.colour_at(obj, obj["appear_frame"])
                elif times == ["end"]:
                    right = colour == world.colour_at(obj, num_frames - 1)
                else:
                    right = colour in (obj["colour"], obj["new_colour"])
                claims.append(right)
                if right and colour == world.colour_at(obj, obj["appear_frame"]):
                    covered.add(("colour", shape))
        for motion in _motions(tokens):
            claims.append(motion == obj["motion"])
            covered |= {("motion", shape)} if motion == obj["motion"] else set()
    # The text's order of events is a claim about their order in time.
    for earlier, later in zip(mentioned_events, mentioned_events[1:]):
        if earlier is not later:
            temporal_claims.append(earlier["frame"] < later["frame"])

    facts = {("count",)} | {(k, o["shape"]) for o in truth["objects"] for k in ("colour", "motion")}
    facts |= {(e["type"], e["shape"]) for e in truth["events"]}
    correctness = sum(claims) / len(claims) if claims else 0.0
    detail = len(covered & facts) / len(facts)
    if truth["events"]:
        event_coverage = len({id(e) for e in mentioned_events}) / len(truth["events"])
        precision = sum(temporal_claims) / len(temporal_claims) if temporal_claims else 1.0
        temporal = precision * event_coverage
    elif temporal_claims:
        temporal = sum(temporal_claims) / len(temporal_claims)
    else:
        temporal = None
    axes = [correctness, detail] + ([temporal] if temporal is not None else [])
    score = sum(axes) / len(axes)
    return Score(correctness, detail, temporal, score, correct=score == 1.0)


# ----------------------------------------------------------------------------- the API

def score_answer(truth: dict, question: str | dict, answer: str) -> Score:
    """Grades `answer` to `question` (its text, or a spec from `text.parse_question`)."""
    spec = synthetic_text.parse_question(question) if isinstance(question, str) else question
    if spec["type"] in synthetic_text.SHORT_TYPES and _question_applies(truth, spec):
        right = float(_grade_short(truth, spec, answer))
        temporal = right if spec["type"] in synthetic_text.TEMPORAL_TYPES else None
        return Score(right, None, temporal, right, correct=bool(right))
    return _grade_description(truth, answer)


def _question_applies(truth: dict, spec: dict) -> bool:
    return any(spec == s for s in synthetic_text.answerable_specs(truth))


def preference(truth: dict, question: str | dict, answer_1: str, answer_2: str) -> int:
    """The ground-truth preference, 1 or 2: the higher score; on a tie the more concise answer."""
    score_1 = score_answer(truth, question, answer_1).score
    score_2 = score_answer(truth, question, answer_2).score
    if score_1 != score_2:
        return 1 if score_1 > score_2 else 2
    return 2 if len(words(answer_2)) < len(words(answer_1)) else 1
