"""Writing a file whole or not at all (a PNG too), and refusing what is not a regular file; a full disk is
the `full_disk` fixture's /dev/full."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynseg.sdk import InvalidArgumentError
from dynseg.sdk.coco_detections import load_coco_detections
from dynseg.sdk.files import check_regular_file, write_png_whole, write_text_whole, write_whole


def test_a_file_appears_whole_and_leaves_no_partial_copy(tmp_path):
    target = write_text_whole(tmp_path / "results.json", "[1, 2]")
    assert target == tmp_path / "results.json" and target.read_text() == "[1, 2]"
    write_text_whole(target, "[3]")  # replaces it
    assert target.read_text() == "[3]" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_file_whose_name_is_near_the_longest_a_name_can_be_is_written(tmp_path):
    # the hidden copy's name must fit too: a name's first 40 characters, not all 250 of them
    target = write_text_whole(tmp_path / ("p" * 245 + ".json"), "{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_full_disk_leaves_what_was_there_and_is_named_with_its_errno(tmp_path, full_disk):
    target = tmp_path / "metrics.json"
    target.write_text("the last run's")
    partial = full_disk(target)
    with pytest.raises(OSError) as raised:
        write_text_whole(target, "x" * 100_000)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_text() == "the last run's" and not partial.is_symlink()


def test_a_failure_without_an_errno_still_names_the_file(tmp_path):
    def refuse(partial: Path) -> None:
        partial.write_text("half")
        raise OSError("the encoder gave up")

    with pytest.raises(OSError, match=r"could not write \S*picture.png: the encoder gave up"):
        write_whole(tmp_path / "picture.png", refuse)
    assert list(tmp_path.iterdir()) == []


def test_what_is_not_a_regular_file_is_named_as_what_it_is(tmp_path):
    check_regular_file(write_text_whole(tmp_path / "dets.json", "[]"), "detections file")
    with pytest.raises(InvalidArgumentError, match=r"^detections file \S*missing.json does not exist$"):
        check_regular_file(tmp_path / "missing.json", "detections file")
    with pytest.raises(InvalidArgumentError, match=r"^model file \S+ is a folder, not a file$"):
        check_regular_file(tmp_path, "model file")
    with pytest.raises(InvalidArgumentError, match=r"^image file \S+ cannot be opened: File name too long$"):
        check_regular_file(tmp_path / ("a" * 5000), "image file")
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(OSError, match="a folder, pipe or device is there, not a file to replace"):
        write_text_whole(tmp_path / "pipe.json", "{}")  # os.replace would have put a file in its place
    assert stat.S_ISFIFO((tmp_path / "pipe.json").stat().st_mode)
    with pytest.raises(InvalidArgumentError, match=r"^detections file \S*pipe.json is a pipe or device, not a regular"):
        check_regular_file(tmp_path / "pipe.json", "detections file")


@pytest.mark.parametrize("path, problem", [
    ("", "must not be an empty path"),  # Path("") would be the current folder
    ("d\x00.json", "'d\\x00.json' holds a NUL byte, which no file name can"),  # else a bare ValueError
    (5, "must be a str or os.PathLike of one, got int"),
    (b"d.json", "must be a str or os.PathLike of one, got bytes"),
])
def test_what_names_no_file_is_refused_naming_the_argument(path, problem):
    with pytest.raises(InvalidArgumentError, match=f"^detections file {re.escape(problem)}$"):
        check_regular_file(path, "detections file")
    with pytest.raises(InvalidArgumentError, match=f"^detections file {re.escape(problem)}$"):
        load_coco_detections(path, ["an image"])


@pytest.mark.parametrize("dtype, largest", [(np.uint8, 255), (np.uint16, 65535)])
def test_a_grey_png_keeps_every_value_of_its_depth(tmp_path, dtype, largest):
    # infer's instance maps are uint16: ids past 255 must come back as written, not wrapped
    picture = np.arange(7 * 11, dtype=np.int64).reshape(7, 11) * (largest // 76)
    picture[-1, -1] = largest
    path = write_png_whole(tmp_path / "grey.png", picture.astype(dtype))
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.array(image), picture)


def test_written_results_entries_read_back_to_the_same_inclusive_boxes(tmp_path):
    import json

    from dynseg.sdk.coco_detections import results_entries

    boxes = np.array([[3, 4, 3, 9], [0, 0, 119, 95], [10.5, 2, 20, 7.25]], np.float32)  # a one-pixel column too
    labels, scores = np.array([2, 1, 3]), np.array([0.5, 0.9, 0.25], np.float32)
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(results_entries("scene", boxes, labels, scores)))
    found = load_coco_detections(path, ["scene"])["scene"]
    order = np.argsort(-scores, kind="stable")  # read back by descending score
    np.testing.assert_array_equal(found["boxes"], boxes[order])
    np.testing.assert_array_equal(found["labels"], labels[order])
    np.testing.assert_array_equal(found["scores"], scores[order])
