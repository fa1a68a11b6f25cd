"""Drawing a truth into frames and encoding them as H.264 mp4 with PyAV.

Encoding is single-threaded with fixed options, so the same truth gives the same bytes with the
pinned PyAV (its bundled FFmpeg and x264).
"""
from __future__ import annotations

import fractions
import functools

import av
import numpy as np

from rlaif_jax.data.synthetic import world

CRF = 12  # near-lossless: decoded frames stay within a few levels of what was drawn
# No B-frames: decode order is display order, which keeps frame-accurate seeking simple.
# No macroblock-tree rate control: with it, x264 (single-threaded, same input) encoded the same
# frames to different bytes about once in a hundred small worlds (18 of 1,500 four-video worlds
# differed from the first; 0 of 1,500 without it), and the decoded pixels moved by up to 11 levels.
X264_OPTIONS = {"crf": str(CRF), "preset": "medium", "x264-params": "bframes=0:mbtree=0"}


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    """[2, S, S] y and x of each pixel's centre (read-only: shared by every call)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    grid.setflags(write=False)
    return grid


def _shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    ys, xs = _pixel_centres(size)
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


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range conversion with 2x2 chroma averaging, as FFmpeg's default.

    Done here (with explicit timestamps in `encode_mp4`) so that everything x264 is given is
    fixed by the frames alone: with swscale's conversion and unset timestamps, the same world was
    seen to encode to different bytes from run to run. Planes are stacked in PyAV's yuv420p
    ndarray layout, [H * 3 / 2, W].
    """
    rgb = frame.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    height, width = frame.shape[:2]

    def subsample(plane):
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    chroma = np.concatenate([subsample(cb).reshape(-1), subsample(cr).reshape(-1)])
    planes = np.concatenate([y.reshape(-1), chroma]).reshape(height * 3 // 2, width)
    return np.clip(np.round(planes), 0, 255).astype(np.uint8)


def encode_mp4(frames: np.ndarray, path: str, fps: int) -> None:
    """Writes uint8 [T, H, W, 3] frames (even H and W) as an H.264 (yuv420p) mp4."""
    height, width = frames.shape[1:3]
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = fractions.Fraction(1, fps)
        stream.codec_context.thread_count = 1  # threading may reorder x264's decisions
        for index, frame in enumerate(frames):
            yuv = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            # Explicit timestamps: x264's rate control reads frame durations from them.
            yuv.pts, yuv.time_base = index, fractions.Fraction(1, fps)
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
