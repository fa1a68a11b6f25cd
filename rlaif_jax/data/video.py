"""Decoding videos (decord) and frame folders, frame sampling, and LLaVA's CLIP preprocessing.

Output of `load_frames` is uint8 [T, S, S, 3]: RGB after pad-to-square and resize. Normalisation
by CLIP's mean and std runs inside the model, on device.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
# LLaVA's expand2square pads with tuple(int(x * 255) for x in image_mean).
CLIP_MEAN_RGB = tuple(int(x * 255) for x in CLIP_MEAN)


class VideoDecodeError(RuntimeError):
    """A video that cannot be read; `reason` is a short key used in skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def sample_indices(num_available: int, num_frames: int) -> np.ndarray:
    """`linspace(0, n-1, T)` rounded down, as the reference; a short video repeats frames."""
    if num_available <= 0:
        raise VideoDecodeError("empty", "no frames")
    return np.linspace(0, num_available - 1, num_frames).astype(np.int64)


def expand_to_square(frame: np.ndarray, fill: Sequence[int] = CLIP_MEAN_RGB) -> np.ndarray:
    """Pads the short side symmetrically with CLIP's mean colour (LLaVA's expand2square)."""
    height, width = frame.shape[:2]
    if height == width:
        return frame
    side = max(height, width)
    square = np.empty((side, side, 3), np.uint8)
    square[...] = np.asarray(fill, np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = frame
    return square


def resize_and_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of the short side to `size`, then a centre crop of `size` x `size`."""
    height, width = frame.shape[:2]
    if (height, width) == (size, size):
        return frame
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def preprocess_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, h, w, 3] -> uint8 [T, size, size, 3] (pad to square, resize, crop)."""
    return np.stack([resize_and_crop(expand_to_square(f), size) for f in frames])


def _decode_with_decord(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    import decord  # lazy: the native decoder loads only when a video is read

    try:
        reader = decord.VideoReader(path, num_threads=1)
        indices = sample_indices(len(reader), num_frames)
        frames = reader.get_batch(list(indices)).asnumpy()
    except VideoDecodeError:
        raise
    except Exception as error:  # decord raises its own DECORDError and plain RuntimeErrors
        raise VideoDecodeError("corrupt", f"{path}: {str(error).splitlines()[0][:200]}")
    return frames, indices


def _decode_with_pyav(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Fallback for files decord rejects although FFmpeg reads them (decord 0.6 fails on some sizes)."""
    import av  # lazy: the fallback decoder, rarely needed

    try:
        with av.open(path) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as error:
        raise VideoDecodeError("corrupt", f"{path}: {str(error).splitlines()[0][:200]}")
    indices = sample_indices(len(decoded), num_frames)
    return np.stack([decoded[i] for i in indices]), indices


def decode_video_file(path: str, num_frames: int, allow_fallback: bool = True
                      ) -> tuple[np.ndarray, np.ndarray, str]:
    """Samples `num_frames` raw RGB frames; returns (frames, frame indices, backend used)."""
    if not os.path.exists(path):
        raise VideoDecodeError("missing", path)
    if os.path.getsize(path) == 0:
        raise VideoDecodeError("empty", path)
    try:
        frames, indices = _decode_with_decord(path, num_frames)
        return frames, indices, "decord"
    except VideoDecodeError as error:
        if not allow_fallback or error.reason != "corrupt":
            raise
        frames, indices = _decode_with_pyav(path, num_frames)
        return frames, indices, "pyav"


def list_frame_files(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names]


def decode_frame_files(paths: Sequence[str], num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference ships videos as folders of JPEGs: sample them as if they were frames."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise VideoDecodeError("missing", f"{len(missing)} frame files, first {missing[0]}")
    indices = sample_indices(len(paths), num_frames)
    frames = []
    for index in indices:
        try:
            with Image.open(paths[index]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except Exception as error:
            raise VideoDecodeError("corrupt", f"{paths[index]}: {error}")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoDecodeError("corrupt", f"frames of different sizes {sorted(shapes)}")
    return np.stack(frames), indices


def resolve_source(source: str | Sequence[str], video_root: str = "") -> str | list[str]:
    """A JSON `images`/`video` entry -> an absolute video path or a list of frame paths.

    A list of images is a frame folder; a path to a directory is read as one too.
    """
    if isinstance(source, (list, tuple)):
        if len(source) == 1 and not source[0].lower().endswith(IMAGE_EXTENSIONS):
            return resolve_source(source[0], video_root)
        return [os.path.join(video_root, p) for p in source]
    path = os.path.join(video_root, source)
    if os.path.isdir(path):
        return list_frame_files(path)
    return path


def find_video_by_name(video_root: str, name: str) -> str:
    """QA files name videos without their extension: the first of VIDEO_EXTENSIONS that exists,
    else a frame folder of that name, else the bare path (which then fails as missing)."""
    direct = os.path.join(video_root, name)
    if os.path.isfile(direct):
        return direct
    for extension in VIDEO_EXTENSIONS:
        candidate = direct + extension
        if os.path.isfile(candidate):
            return candidate
    return direct


def clip_frames(frames: np.ndarray, num_clips: int) -> np.ndarray:
    """[B, T, ...] -> [B * num_clips, T, ...]: the frames cut into consecutive clips
    (`np.array_split`, as the synthetic world cuts them), each resampled to T frames by linspace
    (a short clip repeats frames), so the model sees a clip as it sees a video."""
    batch, num_frames = frames.shape[:2]
    parts = np.array_split(np.arange(num_frames), num_clips)
    if any(len(p) == 0 for p in parts):
        raise ValueError(f"cannot cut {num_frames} frames into {num_clips} clips")
    clips = [frames[:, part[sample_indices(len(part), num_frames)]] for part in parts]
    return np.stack(clips, axis=1).reshape((batch * num_clips,) + frames.shape[1:])


def load_frames(source: str | Sequence[str], num_frames: int, size: int,
                video_root: str = "") -> np.ndarray:
    """One call for every source kind: uint8 [num_frames, size, size, 3]."""
    return load_frames_with_info(source, num_frames, size, video_root)[0]


def load_frames_with_info(source, num_frames: int, size: int, video_root: str = ""
                          ) -> tuple[np.ndarray, np.ndarray, str]:
    """Like load_frames, also returning the sampled indices and the backend that decoded them."""
    resolved = resolve_source(source, video_root)
    if isinstance(resolved, list):
        if not resolved:
            raise VideoDecodeError("empty", f"no frame images for {source!r}")
        frames, indices = decode_frame_files(resolved, num_frames)
        backend = "frames"
    else:
        frames, indices, backend = decode_video_file(resolved, num_frames)
    return preprocess_frames(frames, size), indices, backend
