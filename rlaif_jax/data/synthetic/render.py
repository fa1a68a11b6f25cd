"""Drawing a truth into frames and encoding them as H.264 mp4 with PyAV.

Encoding is single-threaded with fixed options, so the same truth gives the same bytes with the
pinned PyAV (its bundled FFmpeg and x264).
"""
from __future__ import annotations

import av
import numpy as np

from rlaif_jax.data.synthetic import world

CRF = 12  # near-lossless: decoded frames stay within a few levels of what was drawn
X264_OPTIONS = {"crf": str(CRF), "preset": "medium", "bframes": "0"}


def _shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "square":
        return (np.abs(xs - cx) <= radius) & (np.abs(ys - cy) <= radius)
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    if shape == "triangle":  # apex up: inside the three half-planes of its edges
        top, bottom = cy - radius, cy + radius
        inside_height = (ys >= top) & (ys <= bottom)
        half_width = (ys - top) / (2 * radius) * radius
        return inside_height & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def render_frames(truth: dict, frames: list[int] | None = None) -> np.ndarray:
    """uint8 [T, S, S, 3] of the given frame indices (all frames by default)."""
    size, num_frames = truth["size"], truth["num_frames"]
    frames = list(range(num_frames)) if frames is None else frames
    video = np.empty((len(frames), size, size, 3), np.uint8)
    for position, frame in enumerate(frames):
        canvas = np.empty((size, size, 3), np.uint8)
        canvas[...] = world.BACKGROUND
        for obj in truth["objects"]:
            if not world.is_visible(obj, frame):
                continue
            cx, cy = world.object_centre(obj, frame, num_frames, size)
            mask = _shape_mask(obj["shape"], cx, cy, obj["radius"], size)
            canvas[mask] = world.COLOURS[world.colour_at(obj, frame)]
        video[position] = canvas
    return video


def encode_mp4(frames: np.ndarray, path: str, fps: int) -> None:
    """Writes uint8 [T, H, W, 3] frames as an H.264 (yuv420p) mp4."""
    height, width = frames.shape[1:3]
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # threading may reorder x264's decisions
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
