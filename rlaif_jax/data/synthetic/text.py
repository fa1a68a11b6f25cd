"""Language of the synthetic world: descriptions, questions (with a parser) and true answers.

A question is a spec `{"type": ..., plus its slots}`; `question_text(spec)` renders it with a
template and `parse_question(text)` reads any template's text back, so the scorer can grade an
answer from the question's words alone. Answers are short phrases (first curriculum stage) or
descriptions (second stage).
"""
from __future__ import annotations

import re

import numpy as np

from rlaif_jax.data import prompts
from rlaif_jax.data.synthetic import world

# type -> templates; the first is the canonical one, the others paraphrases (consistency eval).
QUESTION_TEMPLATES = {
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "colour_start": ("What colour is the {shape} at the start?",
                     "Which colour does the {shape} have at the start?"),
    "colour_end": ("What colour is the {shape} at the end?",
                   "Which colour does the {shape} have at the end?"),
    "motion": ("Which way does the {shape} move?", "In which direction does the {shape} move?"),
    "count": ("How many shapes are in the video?", "How many shapes does the video show?"),
    "shape_of_colour": ("Which shape is {colour}?", "Which of the shapes is {colour}?"),
    "appear_when": ("When does the {shape} appear?", "At what point does the {shape} appear?"),
    "change_when": ("When does the {shape} change colour?",
                    "At what point does the {shape} change colour?"),
    "first_event": ("What happens first?", "Which event comes first?"),
    "before_after": ("Does the {shape} {verb} before or after the {other} {other_verb}?",),
    "describe": (prompts.CONTEXT_QUESTION, "What happens in this video?",
                 "Tell me about the shapes in this video."),
}
SHORT_TYPES = ("colour", "colour_start", "colour_end", "motion", "count", "shape_of_colour",
               "appear_when", "change_when", "first_event", "before_after")
TEMPORAL_TYPES = ("colour_start", "colour_end", "appear_when", "change_when", "first_event",
                  "before_after")
EVENT_VERBS = {"appears": ("appear", "appears"), "changes": ("change colour", "changes colour")}
TIME_PHRASES = {"start": "at the start", "middle": "in the middle", "end": "at the end"}
MOTION_PHRASES = {"left": "moves left", "right": "moves right", "up": "moves up",
                  "down": "moves down", "still": "does not move"}


# ----------------------------------------------------------------------------- descriptions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _event_sentence(truth: dict, event: dict, with_time: bool) -> str:
    time = f" {TIME_PHRASES[event['time']]}" if with_time else ""
    if event["type"] == "appears":
        obj = world.find_object(truth, event["shape"])
        colour = world.colour_at(obj, event["frame"])
        return (f"{_article(colour)} {colour} {event['shape']} appears{time} and "
                f"{MOTION_PHRASES[obj['motion']]}")
    return f"the {event['shape']} changes from {event['from']} to {event['to']}{time}"


def describe(truth: dict) -> str:
    """A detailed description: the count, each shape as it first shows, then events in order.

    Works on a clip's truth (`world.restrict_to_frames`) too; clips omit the event times, which
    are relative to the whole video.
    """
    is_clip = "clip_frames" in truth
    objects = sorted(truth["objects"], key=lambda o: o["appear_frame"])
    count = len(objects)
    sentences = [f"There {'is' if count == 1 else 'are'} {world.NUMBER_WORDS[count]} "
                 f"shape{'' if count == 1 else 's'}."]
    first_frame = truth["clip_frames"][0] if is_clip else 0
    for obj in objects:
        if obj["appear_frame"] > first_frame:
            continue
        colour = world.colour_at(obj, first_frame)
        sentence = f"{_article(colour)} {colour} {obj['shape']} {MOTION_PHRASES[obj['motion']]}."
        sentences.append(sentence[0].upper() + sentence[1:])
    for event in truth["events"]:
        sentences.append(f"Then {_event_sentence(truth, event, with_time=not is_clip)}.")
    return " ".join(sentences)


def describe_clips(truth: dict) -> list[str]:
    return [describe(world.restrict_to_frames(truth, frames))
            for frames in world.clip_frame_ranges(truth["num_frames"])]


# ----------------------------------------------------------------------------- questions

def question_text(spec: dict, paraphrase: int = 0) -> str:
    templates = QUESTION_TEMPLATES[spec["type"]]
    slots = dict(spec)
    if spec["type"] == "before_after":
        slots["verb"] = EVENT_VERBS[spec["event"]][0]
        slots["other_verb"] = EVENT_VERBS[spec["other_event"]][1]
    return templates[paraphrase % len(templates)].format(**slots)


def _template_regex(template: str) -> re.Pattern:
    verbs = "|".join(sorted((v for forms in EVENT_VERBS.values() for v in forms), key=len,
                            reverse=True))
    slot_patterns = {"shape": "[a-z]+", "other": "[a-z]+", "colour": "[a-z]+",
                     "verb": verbs, "other_verb": verbs}
    pattern = re.escape(template)
    for slot, slot_pattern in slot_patterns.items():
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{slot_pattern})")
    return re.compile("^" + pattern + "$", re.IGNORECASE)


_PARSERS = [(kind, _template_regex(t)) for kind, ts in QUESTION_TEMPLATES.items() for t in ts]
_VERB_TO_EVENT = {form: event for event, forms in EVENT_VERBS.items() for form in forms}


def parse_question(text: str) -> dict:
    """The spec of a question in any template's words; unknown questions read as "describe"."""
    text = text.replace(prompts.IMAGE_TOKEN, "").strip()
    for kind, regex in _PARSERS:
        match = regex.match(text)
        if not match:
            continue
        slots = {k: v.lower() for k, v in match.groupdict().items()}
        if kind == "before_after":
            if slots["verb"] not in _VERB_TO_EVENT or slots["other_verb"] not in _VERB_TO_EVENT:
                continue
            return {"type": kind, "shape": slots["shape"], "event": _VERB_TO_EVENT[slots["verb"]],
                    "other": slots["other"], "other_event": _VERB_TO_EVENT[slots["other_verb"]]}
        return {"type": kind, **slots}
    return {"type": "describe"}


def _event_of(truth: dict, shape: str, kind: str) -> dict | None:
    for event in truth["events"]:
        if event["shape"] == shape and event["type"] == kind:
            return event
    return None


def _event_phrase(event: dict) -> str:
    if event["type"] == "appears":
        return f"the {event['shape']} appeared"
    return f"the {event['shape']} turned {event['to']}"


def true_answer(truth: dict, spec: dict) -> str:
    """The reference answer of a question about this video."""
    kind = spec["type"]
    obj = world.find_object(truth, spec.get("shape", ""))
    if kind == "colour":
        return obj["colour"]
    if kind == "colour_start":
        return world.colour_at(obj, obj["appear_frame"])
    if kind == "colour_end":
        return world.colour_at(obj, truth["num_frames"] - 1)
    if kind == "motion":
        return obj["motion"] if obj["motion"] != "still" else "it does not move"
    if kind == "count":
        return world.NUMBER_WORDS[len(truth["objects"])]
    if kind == "shape_of_colour":
        return f"the {_shapes_of_colour(truth)[spec['colour']]}"
    if kind == "appear_when":
        return TIME_PHRASES[world.time_bucket(obj["appear_frame"], truth["num_frames"])]
    if kind == "change_when":
        return TIME_PHRASES[world.time_bucket(obj["change_frame"], truth["num_frames"])]
    if kind == "first_event":
        return _event_phrase(truth["events"][0])
    if kind == "before_after":
        first = _event_of(truth, spec["shape"], spec["event"])
        second = _event_of(truth, spec["other"], spec["other_event"])
        return "before" if first["frame"] < second["frame"] else "after"
    if kind == "describe":
        return describe(truth)
    raise ValueError(f"unknown question type {kind!r}")


def _shapes_of_colour(truth: dict) -> dict:
    """Colours worn by exactly one shape that never changes: "which shape is red?" is unambiguous."""
    wearers: dict[str, list[str]] = {}
    for obj in truth["objects"]:
        for colour in {obj["colour"], obj["new_colour"]} - {None}:
            wearers.setdefault(colour, []).append(obj["shape"])
    return {c: shapes[0] for c, shapes in wearers.items()
            if len(shapes) == 1 and world.find_object(truth, shapes[0])["change_frame"] is None}


def answerable_specs(truth: dict) -> list[dict]:
    """Every question that has exactly one right answer for this video."""
    specs = [{"type": "count"}, {"type": "describe"}]
    for obj in truth["objects"]:
        shape = obj["shape"]
        specs.append({"type": "motion", "shape": shape})
        if obj["change_frame"] is None:
            specs.append({"type": "colour", "shape": shape})
        else:
            specs.append({"type": "colour_end", "shape": shape})
            specs.append({"type": "change_when", "shape": shape})
            if obj["appear_frame"] == 0:
                specs.append({"type": "colour_start", "shape": shape})
        if obj["appear_frame"] > 0:
            specs.append({"type": "appear_when", "shape": shape})
    for colour in sorted(_shapes_of_colour(truth)):
        specs.append({"type": "shape_of_colour", "colour": colour})
    events = truth["events"]
    if len(events) >= 2:
        specs.append({"type": "first_event"})
        for i in range(len(events)):
            for j in range(len(events)):
                if i != j and events[i]["shape"] != events[j]["shape"]:
                    specs.append({"type": "before_after", "shape": events[i]["shape"],
                                  "event": events[i]["type"], "other": events[j]["shape"],
                                  "other_event": events[j]["type"]})
    return specs


# ----------------------------------------------------------------------------- clip answers

# Questions about one shape whose answer depends on when: asked of a clip, they become "which
# colour does the shape show in this clip", read over the clips in order.
_COLOUR_OVER_TIME = ("colour", "colour_start", "colour_end", "appear_when", "change_when")
# Questions about the order of events: a clip answers with its description.
DESCRIBED_IN_CLIPS = ("first_event", "before_after", "describe")


def clip_answer(truth: dict, spec: dict, frames: list[int]) -> str:
    """What the clip of `frames` shows about question `spec`: the answer to
    `prompts.clip_question(question)` asked of that clip alone (the feedback stage's `question`
    context, and its SFT targets on SFT videos).

    A shape's colour in the clip ("red", "red then blue" when it changes inside the clip, "no
    circle" when the shape is not there yet) for colour and time questions; its motion for
    motion; the shapes in the clip for the count; the clip's description for questions about
    the order of events and for descriptions.
    """
    clip = world.restrict_to_frames(truth, frames)
    kind = spec["type"]
    if kind in DESCRIBED_IN_CLIPS:
        return describe(clip)
    if kind == "count":
        return world.NUMBER_WORDS[len(clip["objects"])]
    if kind == "shape_of_colour":
        for obj in clip["objects"]:
            if spec["colour"] in (obj["colour"], obj["new_colour"]):
                return f"the {obj['shape']}"
        return "none"
    obj = world.find_object(clip, spec["shape"])
    if obj is None:
        return f"no {spec['shape']}"
    if kind == "motion":
        return true_answer(clip, spec)
    if kind in _COLOUR_OVER_TIME:
        if obj["new_colour"] is not None:
            return f"{obj['colour']} then {obj['new_colour']}"
        return obj["colour"]
    raise ValueError(f"unknown question type {kind!r}")


def clip_answers(truth: dict, spec: dict) -> list[str]:
    """`clip_answer` of each of the video's clips, in order."""
    return [clip_answer(truth, spec, frames)
            for frames in world.clip_frame_ranges(truth["num_frames"])]


def wrong_clip_answer(truth: dict, spec: dict, frames: list[int], rng: np.random.Generator
                      ) -> str:
    """A plausible but false clip answer of the same kind (corrupted context slots)."""
    right = clip_answer(truth, spec, frames)
    kind = spec["type"]
    if kind in DESCRIBED_IN_CLIPS:
        for _ in range(8):
            wrong = describe(perturb_truth(world.restrict_to_frames(truth, frames), rng))
            if wrong != right:
                return wrong
        return wrong
    if kind == "count":
        options = list(world.NUMBER_WORDS[:4])
    elif kind == "shape_of_colour":
        options = ["none"] + [f"the {s}" for s in world.SHAPES]
    elif kind == "motion":
        options = [m if m != "still" else "it does not move" for m in world.MOTIONS]
        options.append(f"no {spec['shape']}")
    else:
        options = list(world.COLOURS) + [f"no {spec['shape']}"]
    return str(rng.choice([o for o in options if o != right]))


# ----------------------------------------------------------------------------- wrong answers

def wrong_answer(truth: dict, spec: dict, rng: np.random.Generator) -> str:
    """A plausible but false answer of the same kind (judge training and oracle preferences)."""
    kind = spec["type"]
    right = true_answer(truth, spec)
    if kind in ("colour", "colour_start", "colour_end"):
        return str(rng.choice([c for c in world.COLOURS if c != right]))
    if kind == "motion":
        options = [m if m != "still" else "it does not move" for m in world.MOTIONS]
        return str(rng.choice([m for m in options if m != right]))
    if kind == "count":
        return str(rng.choice([w for w in world.NUMBER_WORDS[1:4] if w != right]))
    if kind == "shape_of_colour":
        return "the " + str(rng.choice([s for s in world.SHAPES if f"the {s}" != right]))
    if kind in ("appear_when", "change_when"):
        return str(rng.choice([p for p in TIME_PHRASES.values() if p != right]))
    if kind == "first_event":
        return _event_phrase(truth["events"][int(rng.integers(1, len(truth["events"])))])
    if kind == "before_after":
        return "after" if right == "before" else "before"
    if kind == "describe":
        return describe(perturb_truth(truth, rng))
    raise ValueError(f"unknown question type {kind!r}")


def perturb_truth(truth: dict, rng: np.random.Generator) -> dict:
    """A copy of the truth with one thing wrong: a colour, a motion, an extra or missing shape,
    or two events swapped in time. Its description is a fluent, wrong description."""
    fake = {**truth, "objects": [dict(o) for o in truth["objects"]]}
    options = ["colour", "motion", "extra"]
    if len(fake["objects"]) > 1:
        options.append("missing")
    if len(truth["events"]) >= 2:
        options.append("order")
    choice = str(rng.choice(options))
    obj = fake["objects"][int(rng.integers(len(fake["objects"])))]
    if choice == "colour":
        obj["colour"] = str(rng.choice([c for c in world.COLOURS
                                        if c not in (obj["colour"], obj["new_colour"])]))
    elif choice == "motion":
        obj["motion"] = str(rng.choice([m for m in world.MOTIONS if m != obj["motion"]]))
    elif choice == "missing":
        fake["objects"].remove(obj)
    elif choice == "extra":
        present = {o["shape"] for o in fake["objects"]}
        absent = [s for s in world.SHAPES if s not in present]
        if absent:
            fake["objects"].append({**fake["objects"][0], "shape": absent[0], "appear_frame": 0,
                                    "change_frame": None, "new_colour": None,
                                    "colour": str(rng.choice(list(world.COLOURS)))})
        else:  # all shapes already there: fall back to a wrong count of nothing else
            obj["motion"] = str(rng.choice([m for m in world.MOTIONS if m != obj["motion"]]))
    elif choice == "order":
        first, second = truth["events"][0], truth["events"][-1]
        for o in fake["objects"]:  # swap the frames of the first and last events
            for event, other in ((first, second), (second, first)):
                if o["shape"] == event["shape"]:
                    key = "appear_frame" if event["type"] == "appears" else "change_frame"
                    o[key] = other["frame"]
        if any(o["change_frame"] is not None and o["change_frame"] <= o["appear_frame"]
               for o in fake["objects"]):  # a swap that breaks causality: change a colour
            return _recolour(truth, rng)
    fake["events"] = world.list_events(fake)
    return fake


def _recolour(truth: dict, rng: np.random.Generator) -> dict:
    fake = {**truth, "objects": [dict(o) for o in truth["objects"]]}
    obj = fake["objects"][0]
    obj["colour"] = str(rng.choice([c for c in world.COLOURS
                                    if c not in (obj["colour"], obj["new_colour"])]))
    fake["events"] = world.list_events(fake)
    return fake
