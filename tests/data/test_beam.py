"""The builders on Apache Beam (DirectRunner) give the same data as the in-process build.

Beam lives in its own environment (requirements-beam.txt), so this test is skipped where
apache_beam is not installed.
"""
import os

import numpy as np
import pytest

from tests.support import MIXED_SKIPS, write_mixed_items

pytest.importorskip("apache_beam")


def test_direct_runner_build_equals_in_process_build(world_dir, mixed_data, tmp_path):  # noqa: F811
    from rlaif_jax.data.build import build
    from rlaif_jax.data.built import BuiltData

    json_path = write_mixed_items(world_dir, str(tmp_path / "root"))
    out = str(tmp_path / "beam")
    info = build("instruction", {"train": json_path}, str(tmp_path / "root"), out,
                 num_frames=8, size=64, beam_runner="DirectRunner", verbose=False)
    assert info["skipped"]["train"] == MIXED_SKIPS
    beam_data, plain = BuiltData(out), BuiltData(mixed_data)
    assert len(beam_data.frames) == len(plain.frames) == 5
    for i in range(len(plain.frames)):
        a, b = beam_data.frames[i], plain.frames[i]
        assert os.path.basename(a["source"]) == os.path.basename(b["source"])
        assert a["ok"] == b["ok"]
        np.testing.assert_array_equal(a["frames"], b["frames"])
    items_a, items_b = beam_data.items("train"), plain.items("train")
    assert [items_a[i]["id"] for i in range(len(items_a))] == \
        [items_b[i]["id"] for i in range(len(items_b))]
