"""Reading a judge's reply: a score (and for QA a yes / no verdict), or a named failure.

Chat models asked for `{'pred': 'yes', 'score': 4}` reply in many ways: prose around the dict,
single quotes, Python literals, markdown fences, "4/5", "four", "Yes." with no dict at all, a
missing key. `parse_reply` tries, in order: a dict found in the text (JSON, then a Python
literal, then a lenient rewrite), then keyed patterns in the prose ("score: 4", "pred: yes"),
then for QA a reply that starts with yes / no and for scores a lone "N/5" or "N out of 5". It
never raises: anything it cannot read with confidence comes back as a failure with a reason
(`missing_score`, `ambiguous_score`, `score_out_of_range`, ...) that the caller counts.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from typing import Any, Optional

from rlaif_jax.data.prompts import QA_AXIS, SCORE_MAX


@dataclasses.dataclass(frozen=True)
class ParsedReply:
    score: Optional[float] = None
    pred: Optional[str] = None  # "yes" / "no" for QA, None otherwise
    error: Optional[str] = None  # why the reply could not be read; None when it was

    @property
    def ok(self) -> bool:
        return self.error is None


NUMBER_WORDS = {"zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
                "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
YES_WORDS = {"yes", "y", "true", "correct", "match", "matches", "right"}
NO_WORDS = {"no", "n", "false", "incorrect", "wrong", "mismatch", "nomatch"}
PRED_KEYS = ("pred", "prediction", "verdict", "match", "correct", "answer")
SCORE_KEYS = ("score", "rating", "grade")

_NUMBER = r"\d+(?:\.\d+)?"
_NUMBER_OR_WORD = rf"(?:{_NUMBER}|{'|'.join(NUMBER_WORDS)})"
# "4", "4.5", "four", "4/5", "4 / 10", "4 out of 5"
_VALUE = rf"({_NUMBER_OR_WORD})(?:\s*(?:/|out\s+of)\s*({_NUMBER}|{'|'.join(NUMBER_WORDS)}))?"
_KEYED_SCORE = re.compile(
    rf"\b(?:{'|'.join(SCORE_KEYS)})\b[\"']?\s*(?:[:=\-\u2013]|is|of)?\s*[\"']?\s*{_VALUE}", re.I)
_KEYED_PRED = re.compile(
    rf"\b(?:{'|'.join(PRED_KEYS)})\b[\"']?\s*(?:[:=]|is)\s*[\"']?\s*([a-z]+)", re.I)
_FRACTION = re.compile(rf"(?<![\w.])({_NUMBER_OR_WORD})\s*(?:/|out\s+of)\s*({_NUMBER}|five|ten)\b",
                       re.I)
_LEADING_WORD = re.compile(r"^\W*([a-z]+)\b", re.I)


def _number(text: Any) -> Optional[float]:
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    if not isinstance(text, str):
        return None
    word = text.strip().strip("'\"").strip().lower()
    if word in NUMBER_WORDS:
        return float(NUMBER_WORDS[word])
    try:
        return float(word)
    except ValueError:
        return None


def _scaled(value: float, denominator: Optional[float]) -> Optional[float]:
    """`value` on the 0-5 scale: "4/5" -> 4, "8/10" -> 4; None for a denominator of 0."""
    if denominator is None or denominator == SCORE_MAX:
        return value
    if denominator <= 0:
        return None
    return value * SCORE_MAX / denominator


def _score_value(raw: Any) -> Optional[float]:
    """A dict's score value: a number, a numeric or number-word string, or "N/M"."""
    value = _number(raw)
    if value is not None:
        return value
    if isinstance(raw, str):
        match = re.fullmatch(rf"\s*{_VALUE}\s*", raw.strip().strip("'\""), re.I)
        if match:
            denominator = _number(match.group(2)) if match.group(2) else None
            return _scaled(_number(match.group(1)), denominator)
    return None


def _pred_value(raw: Any) -> Optional[str]:
    if isinstance(raw, bool):
        return "yes" if raw else "no"
    if isinstance(raw, str):
        word = re.sub(r"[^a-z]", "", raw.lower())
        if word in YES_WORDS:
            return "yes"
        if word in NO_WORDS:
            return "no"
    return None


def _balanced_objects(text: str) -> list[str]:
    """Every outermost `{...}` span of the text, in order (braces inside quotes are not tracked:
    judge replies do not quote braces, and a wrong span only costs a fallback)."""
    spans, depth, start = [], 0, None
    for index, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = index
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start:index + 1])
    return spans


def _lenient(text: str) -> str:
    """A dict-ish string rewritten towards JSON: quotes, Python literals, bare keys, commas."""
    text = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'")
    text = text.replace("\u2019", "'").replace("'", '"')
    text = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", text))
    text = re.sub(r"\bNone\b", "null", text)
    text = re.sub(r"([{,]\s*)([A-Za-z_]\w*)\s*:", r'\1"\2":', text)  # bare keys
    text = re.sub(r":\s*([A-Za-z][\w ]*?)\s*([,}])", r': "\1"\2', text)  # bare word values
    return re.sub(r",\s*}", "}", text)


def _as_dict(span: str) -> Optional[dict]:
    for attempt in (lambda s: json.loads(s), ast.literal_eval, lambda s: json.loads(_lenient(s))):
        try:
            value = attempt(span)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return {str(k).strip().lower(): v for k, v in value.items()}
    return None


def _from_dict(found: dict, keys) -> tuple[bool, Any]:
    for key in keys:
        if key in found:
            return True, found[key]
    return False, None


def _unique(values: list) -> tuple[Optional[Any], bool]:
    """(the value, ambiguous?) of a list of candidate readings."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    if not distinct:
        return None, False
    return distinct[0], len(distinct) > 1


def _prose_score(text: str) -> tuple[Optional[float], Optional[str]]:
    keyed = []
    for match in _KEYED_SCORE.finditer(text):
        value = _number(match.group(1))
        denominator = _number(match.group(2)) if match.group(2) else None
        keyed.append(None if value is None else _scaled(value, denominator))
    value, ambiguous = _unique(keyed)
    if value is None:
        fractions = [_scaled(_number(m.group(1)), _number(m.group(2)))
                     for m in _FRACTION.finditer(text) if _number(m.group(1)) is not None]
        value, ambiguous = _unique(fractions)
    if ambiguous:
        return None, "ambiguous_score"
    return value, None


def _prose_pred(text: str) -> tuple[Optional[str], Optional[str]]:
    value, ambiguous = _unique([_pred_value(m.group(1)) for m in _KEYED_PRED.finditer(text)])
    if value is None:
        leading = _LEADING_WORD.match(text)
        value = _pred_value(leading.group(1)) if leading else None
        if value is not None and leading.group(1).lower() in {"y", "n", "right", "match"}:
            value = None  # too weak to read as a verdict on its own
        ambiguous = False
    if ambiguous:
        return None, "ambiguous_pred"
    return value, None


def _parse(text: Any, axis: str) -> ParsedReply:
    if not isinstance(text, str) or not text.strip():
        return ParsedReply(error="empty_reply")
    want_pred = axis == QA_AXIS
    score = pred = None
    score_error = pred_error = None
    # 1. A dict anywhere in the reply (the last complete one that has a key we want wins: models
    #    sometimes restate an example before their answer).
    for span in reversed(_balanced_objects(text)):
        found = _as_dict(span)
        if found is None:
            continue
        has_score, raw_score = _from_dict(found, SCORE_KEYS)
        has_pred, raw_pred = _from_dict(found, PRED_KEYS)
        if not (has_score or (want_pred and has_pred)):
            continue
        if has_score:
            score = _score_value(raw_score)
            score_error = None if score is not None else "unreadable_score"
        if want_pred and has_pred:
            pred = _pred_value(raw_pred)
            pred_error = None if pred is not None else "unreadable_pred"
        break
    # 2. Keyed values or plain verdicts in the prose, for what the dict did not give.
    if score is None and score_error is None:
        score, score_error = _prose_score(text)
    if want_pred and pred is None and pred_error is None:
        pred, pred_error = _prose_pred(text)
    if score is None:
        return ParsedReply(pred=pred, error=score_error or "missing_score")
    if not 0 <= score <= SCORE_MAX:
        return ParsedReply(pred=pred, error="score_out_of_range")
    if want_pred and pred is None:
        return ParsedReply(score=score, error=pred_error or "missing_pred")
    return ParsedReply(score=score, pred=pred if want_pred else None)


def parse_reply(text: Any, axis: str) -> ParsedReply:
    """The judge's verdict on `axis` read from `text`; never raises (failures carry `error`)."""
    try:
        return _parse(text, axis)
    except Exception as error:  # a parser bug must not stop an evaluation: count it instead
        return ParsedReply(error=f"parser_error:{type(error).__name__}")
