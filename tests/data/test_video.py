"""Video decoding (decord), frame folders, frame sampling and CLIP-style preprocessing."""
import os

import av
import numpy as np
import pytest
from PIL import Image

from rlaif_jax.data import video
from rlaif_jax.data.synthetic import encode_mp4, render_frames

# A square moving right and a circle that turns blue: every frame differs from its neighbours.
TRUTH = {
    "name": "known", "num_frames": 8, "size": 64, "fps": 4,
    "objects": [
        {"shape": "square", "colour": "red", "new_colour": None, "change_frame": None,
         "motion": "right", "appear_frame": 0, "start": [12.0, 20.0], "radius": 7.0},
        {"shape": "circle", "colour": "yellow", "new_colour": "blue", "change_frame": 5,
         "motion": "up", "appear_frame": 2, "start": [40.0, 50.0], "radius": 7.0},
    ],
}


@pytest.fixture(scope="module")
def drawn_and_file(tmp_path_factory):
    frames = render_frames(TRUTH)
    path = str(tmp_path_factory.mktemp("video") / "known.mp4")
    encode_mp4(frames, path, fps=4)
    return frames, path


def test_decoded_mp4_matches_what_was_drawn(drawn_and_file):
    drawn, path = drawn_and_file
    frames, indices, backend = video.load_frames_with_info(path, num_frames=5, size=64)
    assert backend == "decord"
    np.testing.assert_array_equal(indices, [0, 1, 3, 5, 7])  # linspace(0, 7, 5) rounded down
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
    errors = np.abs(frames.astype(np.float64) - drawn[indices]).mean(axis=(1, 2, 3)) / 255
    assert errors.max() < 8 / 255, errors
    # The indices are really the frames returned: each decoded frame is nearest its own drawn one.
    distance = np.abs(frames[:, None].astype(np.float64) - drawn[None]).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(distance.argmin(axis=1), indices)


def test_short_videos_repeat_frames():
    np.testing.assert_array_equal(video.sample_indices(3, 8), [0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(video.sample_indices(50, 50), np.arange(50))
    with pytest.raises(video.VideoDecodeError):
        video.sample_indices(0, 4)


def _write_frames(folder, frames, extension):
    os.makedirs(folder, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, f"{i + 1:04d}.{extension}"))


def test_frame_folder_and_video_file_give_the_same_frames(drawn_and_file, tmp_path):
    _, path = drawn_and_file
    import decord

    reader = decord.VideoReader(path)
    every_frame = reader.get_batch(list(range(len(reader)))).asnumpy()
    _write_frames(tmp_path / "png", every_frame, "png")
    _write_frames(tmp_path / "jpg", every_frame, "jpg")
    from_file = video.load_frames(path, num_frames=5, size=32)
    # A folder, or (as the reference's JSON) a list of image paths relative to a root.
    from_folder = video.load_frames(str(tmp_path / "png"), num_frames=5, size=32)
    names = sorted(os.listdir(tmp_path / "png"))
    from_list = video.load_frames([f"png/{n}" for n in names], 5, 32, video_root=str(tmp_path))
    np.testing.assert_array_equal(from_folder, from_file)
    np.testing.assert_array_equal(from_list, from_file)
    from_jpegs = video.load_frames(str(tmp_path / "jpg"), num_frames=5, size=32)
    assert np.abs(from_jpegs.astype(float) - from_file).mean() < 4  # JPEG is lossy


@pytest.mark.parametrize("extension,codec", [("webm", "libvpx-vp9"), ("avi", "mpeg4"),
                                             ("mkv", "libx264")])
def test_other_containers_decode(drawn_and_file, tmp_path, extension, codec):
    drawn, _ = drawn_and_file
    path = str(tmp_path / f"clip.{extension}")
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"crf": "10", "b:v": "0"} if codec != "mpeg4" else {"qscale": "2"}
        for frame in drawn:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    frames, indices, _ = video.load_frames_with_info(path, num_frames=4, size=64)
    assert np.abs(frames.astype(float) - drawn[indices]).mean() < 12


def test_pad_to_square_with_clip_mean_then_resize():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[...] = (255, 0, 0)
    square = video.expand_to_square(wide)
    assert square.shape == (40, 40, 3)
    np.testing.assert_array_equal(square[0, 0], video.CLIP_MEAN_RGB)  # padding rows
    np.testing.assert_array_equal(square[:10], np.broadcast_to(video.CLIP_MEAN_RGB, (10, 40, 3)))
    np.testing.assert_array_equal(square[10:30], wide)
    out = video.preprocess_frames(wide[None], size=20)
    assert out.shape == (1, 20, 20, 3)
    np.testing.assert_array_equal(out[0, 10, 10], (255, 0, 0))
    np.testing.assert_array_equal(out[0, 0, 10], video.CLIP_MEAN_RGB)
    tall = np.zeros((30, 10, 3), np.uint8)  # resize short side, then centre crop
    assert video.resize_and_crop(tall, 5).shape == (5, 5, 3)


def test_unreadable_videos_raise_with_a_reason(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(2048))
    reasons = {}
    for name in ("empty.mp4", "corrupt.mp4", "missing.mp4"):
        with pytest.raises(video.VideoDecodeError) as error:
            video.load_frames(str(tmp_path / name), 4, 32)
        reasons[name] = error.value.reason
    assert reasons == {"empty.mp4": "empty", "corrupt.mp4": "corrupt", "missing.mp4": "missing"}
