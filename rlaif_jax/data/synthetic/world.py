"""The structured truth of a synthetic video: objects, attributes, motions, events and times.

A video holds one to three shapes (distinct shapes, so "the square" names one object). A shape
may move in one direction or stay still, may appear after the first frame, and may change colour
once. Appearing and changing colour are the events; no two events share a frame, so their order
is always defined. Everything here is plain JSON-serialisable data.
"""
from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 50),
    "purple": (160, 70, 200),
    "white": (240, 240, 240),
}
BACKGROUND = (24, 24, 24)
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("left", "right", "up", "down", "still")
MOTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
TIME_BUCKETS = ("start", "middle", "end")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
NUM_CLIPS = 3

# Geometry relative to the frame size.
RADIUS_FRACTION = 0.12
TRAVEL_FRACTION = 0.35  # distance a moving shape covers over the whole video
P_APPEARS_LATER = 0.35
P_CHANGES_COLOUR = 0.4


def time_bucket(frame: int, num_frames: int) -> str:
    """start / middle / end: the thirds of the video, the same split as its clips."""
    return TIME_BUCKETS[clip_of_frame(frame, num_frames)]


def clip_frame_ranges(num_frames: int, num_clips: int = NUM_CLIPS) -> list[list[int]]:
    """Frame indices of each clip (np.array_split of the frames, as the feedback stage splits)."""
    return [part.tolist() for part in np.array_split(np.arange(num_frames), num_clips)]


def clip_of_frame(frame: int, num_frames: int) -> int:
    for clip, frames in enumerate(clip_frame_ranges(num_frames)):
        if frame in frames:
            return clip
    raise ValueError(f"frame {frame} outside a video of {num_frames} frames")


def object_centre(obj: dict, frame: int, num_frames: int, size: int) -> tuple[float, float]:
    dx, dy = MOTION_VECTORS[obj["motion"]]
    progress = frame / max(1, num_frames - 1)
    travel = TRAVEL_FRACTION * size * progress
    return obj["start"][0] + dx * travel, obj["start"][1] + dy * travel


def colour_at(obj: dict, frame: int) -> str:
    if obj["change_frame"] is not None and frame >= obj["change_frame"]:
        return obj["new_colour"]
    return obj["colour"]


def is_visible(obj: dict, frame: int) -> bool:
    return frame >= obj["appear_frame"]


def _paths_collide(objects: list[dict], num_frames: int, size: int, radius: float) -> bool:
    for frame in range(num_frames):
        centres = [object_centre(o, frame, num_frames, size) for o in objects]
        for i in range(len(centres)):
            for j in range(i + 1, len(centres)):
                distance = np.hypot(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1])
                if distance < 2 * radius + 2:
                    return True
    return False


def _sample_start(rng: np.random.Generator, motion: str, size: int, radius: float) -> list[float]:
    """A start point from which the whole path stays inside the frame."""
    dx, dy = MOTION_VECTORS[motion]
    travel = TRAVEL_FRACTION * size
    margin = radius + 1
    low_x, high_x = margin - min(dx, 0) * travel, size - margin - max(dx, 0) * travel
    low_y, high_y = margin - min(dy, 0) * travel, size - margin - max(dy, 0) * travel
    return [float(rng.uniform(low_x, high_x)), float(rng.uniform(low_y, high_y))]


def sample_truth(rng: np.random.Generator, name: str, num_frames: int, size: int,
                 fps: int) -> dict:
    """Draws one video's truth; rejection-samples paths until the shapes never overlap."""
    radius = RADIUS_FRACTION * size
    num_objects = int(rng.integers(1, len(SHAPES) + 1))
    shapes = [str(s) for s in rng.permutation(SHAPES)[:num_objects]]
    # Event frames are drawn without replacement so that no two events coincide.
    free_event_frames = [int(f) for f in rng.permutation(np.arange(1, num_frames))]
    objects = []
    for position, shape in enumerate(shapes):
        colour = str(rng.choice(list(COLOURS)))
        obj = {"shape": shape, "colour": colour, "new_colour": None, "change_frame": None,
               "motion": str(rng.choice(MOTIONS)), "appear_frame": 0, "start": None,
               "radius": radius}
        # The first shape is always there from the first frame: a video is never empty.
        if position > 0 and free_event_frames and rng.random() < P_APPEARS_LATER:
            # Appearing in the very last frame would leave nothing to see of the shape.
            candidates = [f for f in free_event_frames if f < num_frames - 1]
            if candidates:
                obj["appear_frame"] = candidates[0]
                free_event_frames.remove(candidates[0])
        if rng.random() < P_CHANGES_COLOUR:
            later = [f for f in free_event_frames if f > obj["appear_frame"]]
            if later:
                obj["change_frame"] = later[0]
                free_event_frames.remove(later[0])
                obj["new_colour"] = str(rng.choice([c for c in COLOURS if c != colour]))
        objects.append(obj)
    for _ in range(200):
        for obj in objects:
            obj["start"] = _sample_start(rng, obj["motion"], size, radius)
        if not _paths_collide(objects, num_frames, size, radius):
            break
    else:  # crowded: keep the first shape only rather than draw overlapping ones
        objects = objects[:1]
    truth = {"name": name, "num_frames": num_frames, "size": size, "fps": fps,
             "objects": objects}
    truth["events"] = list_events(truth)
    return truth


def list_events(truth: dict) -> list[dict]:
    """Appearances and colour changes, in the order they happen."""
    num_frames = truth["num_frames"]
    events = []
    for obj in truth["objects"]:
        if obj["appear_frame"] > 0:
            events.append({"type": "appears", "shape": obj["shape"], "frame": obj["appear_frame"]})
        if obj["change_frame"] is not None:
            events.append({"type": "changes", "shape": obj["shape"], "frame": obj["change_frame"],
                           "from": obj["colour"], "to": obj["new_colour"]})
    for event in events:
        event["time"] = time_bucket(event["frame"], num_frames)
        event["seconds"] = round(event["frame"] / truth["fps"], 3)
    return sorted(events, key=lambda e: e["frame"])


def find_object(truth: dict, shape: str) -> dict | None:
    for obj in truth["objects"]:
        if obj["shape"] == shape:
            return obj
    return None


def restrict_to_frames(truth: dict, frames: list[int]) -> dict:
    """The truth of a clip: shapes visible in it, colours as at its first frame, its own events.

    Frame numbers keep the video's numbering so that `colour_at` and `is_visible` still apply.
    """
    first, last = frames[0], frames[-1]
    objects = []
    for obj in truth["objects"]:
        if obj["appear_frame"] > last:
            continue
        clipped = dict(obj)
        clipped["colour"] = colour_at(obj, max(first, obj["appear_frame"]))
        if obj["change_frame"] is None or not first < obj["change_frame"] <= last:
            clipped["change_frame"], clipped["new_colour"] = None, None
        if obj["appear_frame"] <= first:
            clipped["appear_frame"] = first
        objects.append(clipped)
    clip = dict(truth, objects=objects, clip_frames=list(frames))
    clip["events"] = [e for e in list_events(dict(clip, objects=objects)) if e["frame"] > first]
    return clip
