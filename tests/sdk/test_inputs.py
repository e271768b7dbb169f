"""dynseg.sdk.inputs: images from arrays and files, and detections checked, floored, clipped and dropped
(the network's check_detections is this one, strict); every bad argument named; a hypothesis fuzz."""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from dynseg.sdk import samples
from dynseg.sdk.errors import DetectionsDroppedWarning, InvalidArgumentError
from dynseg.sdk.inputs import INVERTED, OUTSIDE, Detections, check_detections, load_image

H, W, K, LIMIT = 40, 60, 3, 8


def check(boxes, labels=None, scores=None, **overrides) -> Detections:
    count = len(np.asarray(boxes).reshape(-1, 4)) if np.asarray(boxes).size else 0
    options = dict(height=H, width=W, num_classes=K, max_detections=LIMIT) | overrides
    return check_detections(
        boxes,
        [1] * count if labels is None else labels,
        [0.5] * count if scores is None else scores,
        **options,
    )


# ------------------------------------------------------------------------------------------- images


def test_an_rgb_uint8_array_comes_back_as_it_is() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert load_image(image) is image


def test_a_non_contiguous_rgb_array_comes_back_contiguous_and_equal() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 14, 3), dtype=np.uint8)[:, ::2]
    loaded = load_image(image)
    assert loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, image)


def test_grayscale_is_replicated_into_three_channels() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    loaded = load_image(gray)
    assert loaded.shape == (3, 4, 3) and loaded.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], gray)


def test_rgba_loses_its_alpha_channel_without_compositing() -> None:
    rgba = np.random.default_rng(1).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the stored colour is kept anyway
    np.testing.assert_array_equal(load_image(rgba), rgba[..., :3])


def test_a_png_path_reads_the_shipped_sample(tmp_path: Path) -> None:
    loaded = load_image(samples.path("coffee"))
    with Image.open(samples.path("coffee")) as opened:
        np.testing.assert_array_equal(loaded, np.array(opened.convert("RGB")))
    assert load_image(str(samples.path("coffee"))).shape == loaded.shape


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_png_files_of_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    path = tmp_path / f"{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    loaded = load_image(path)
    assert loaded.shape == (6, 9, 3) and loaded.dtype == np.uint8
    with Image.open(path) as opened:  # Pillow's own conversion is the oracle
        np.testing.assert_array_equal(loaded, np.array(opened.convert("RGB")))
    if mode in ("L", "LA"):
        assert (loaded == loaded[..., :1]).all()  # grey: the three channels agree
    if mode == "RGBA":
        np.testing.assert_array_equal(loaded, rgb)


def test_a_jpeg_path_is_read(tmp_path: Path) -> None:
    rgb = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    loaded = load_image(path)
    assert loaded.shape == (16, 16, 3)
    assert np.abs(loaded.astype(int) - rgb).max() <= 8  # JPEG is lossy


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 3), np.uint16), "uint8"),
        (np.zeros((4, 4, 3), bool), "uint8"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros(5, np.uint8), "shape"),
        (np.zeros((4, 4, 2), np.uint8), "channels"),
        (np.zeros((4, 4, 5), np.uint8), "channels"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 0), np.uint8), "empty: shape (4, 0)"),  # the caller's shape, not a channel axis added
        ([[1, 2], [3, 4]], "uint8"),
        (b"image.png", "bytes"),
        (None, "got None"),
        (np.ma.masked_equal(np.zeros((4, 4, 3), np.uint8), 0), "masked array"),
    ],
)
def test_bad_image_arrays_raise_naming_the_image(image: object, words: str) -> None:
    with pytest.raises(InvalidArgumentError, match="image") as raised:
        load_image(image)
    assert words in str(raised.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    with pytest.raises(InvalidArgumentError, match="does not exist") as raised:
        load_image(missing)
    assert str(missing) in str(raised.value)


def test_a_folder_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="not a file"):
        load_image(tmp_path)


def test_a_file_that_is_not_an_image_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(InvalidArgumentError, match="could not be read") as raised:
        load_image(path)
    assert str(path) in str(raised.value)


def test_a_truncated_png_is_refused(tmp_path: Path) -> None:
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InvalidArgumentError, match="cut.png"):
        load_image(cut)


def test_a_16_bit_png_is_refused_rather_than_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(path)
    with pytest.raises(InvalidArgumentError, match="8-bit"):
        load_image(path)


def _png_16_bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of uint16 (H, W, 3) pixels, written by hand: Pillow writes no such file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_rgb_png_comes_in_as_the_top_byte_of_each_channel(tmp_path: Path) -> None:
    pixels = np.random.default_rng(4).integers(0, 65536, (3, 5, 3), dtype=np.uint16)
    path = tmp_path / "deep_rgb.png"
    path.write_bytes(_png_16_bit_rgb(pixels))
    np.testing.assert_array_equal(load_image(path), (pixels >> 8).astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1"])
def test_a_pil_image_converts_as_its_file_would(tmp_path: Path, mode: str) -> None:
    # np.asarray of a PIL image is its storage: a palette image's indices, CMYK's four bytes
    picture = Image.fromarray(samples.load("chelsea")[:40, :60]).convert(mode)
    path = tmp_path / ("picture.tif" if mode == "CMYK" else "picture.png")
    picture.save(path)
    with Image.open(path) as opened:
        np.testing.assert_array_equal(load_image(opened), load_image(path))


def test_a_16_bit_pil_image_is_refused_rather_than_clipped() -> None:
    with pytest.raises(InvalidArgumentError, match="PIL image.*8-bit"):
        load_image(Image.fromarray(np.full((4, 4), 40000, np.uint16)))


# --------------------------------------------------------------------------------------- detections


def test_no_detections_is_valid() -> None:
    for empty in ([], np.zeros((0, 4), np.float32)):
        detections = check(empty, labels=[], scores=[])
        assert len(detections) == 0
        assert detections.boxes.shape == (0, 4) and detections.boxes.dtype == np.float32
        assert detections.labels.dtype == np.int64 and detections.scores.dtype == np.float32
        assert detections.kept.dtype == np.int64 and detections.dropped == []


def test_boxes_are_floored_to_integers_like_the_network() -> None:
    detections = check([[1.9, 2.5, 10.99, 20.0]], labels=[2], scores=[0.25])
    np.testing.assert_array_equal(detections.boxes, [[1, 2, 10, 20]])
    assert detections.labels.tolist() == [2] and detections.scores.tolist() == [0.25]


def test_boxes_partly_outside_are_clipped_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detections = check([[-5.5, -0.5, 100.0, 10.0], [3, 4, 5, 6]])
    np.testing.assert_array_equal(detections.boxes, [[0, 0, W - 1, 10], [3, 4, 5, 6]])


def test_boxes_that_looks_normalised_are_refused_as_a_results_file_of_them_is() -> None:
    # each would become the image's top-left pixel, inside the image: segmented, with no warning
    with pytest.raises(InvalidArgumentError, match=r"^boxes: every box lies within \[0, 1\], in fractions of a "
                                                   r"pixel: normalised coordinates\?"):
        check([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]])
    with pytest.raises(InvalidArgumentError, match=r"^boxes: every box lies within \[0, 1\]"):
        check([[0.0, 0.1, 0.5, 1.0]])  # a normalised box at the image's border: some coordinates whole
    assert len(check([[0, 0, 1, 1], [0, 0, 0, 0]])) == 2  # whole pixels: the top-left corner's
    assert len(check([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 1.5, 0.8]])) == 2  # one reaches past a pixel


def test_an_image_path_that_names_no_file_is_refused_naming_it() -> None:
    for path, problem in (("", "image file must not be an empty path"),
                          ("a\x00.png", "image file 'a\\x00.png' holds a NUL byte, which no file name can")):
        with pytest.raises(InvalidArgumentError, match=f"^{re.escape(problem)}$"):
            load_image(path)


def test_inverted_and_outside_boxes_are_dropped_with_a_warning_and_a_record() -> None:
    boxes = [
        [10, 10, 20, 20],  # kept
        [20, 10, 10, 20],  # inverted in x
        [10, 20, 20, 10],  # inverted in y
        [-10, -10, -1, -1],  # wholly outside (above left)
        [W, 0, W + 5, 5],  # wholly outside (right)
        [0, H, 5, H + 3],  # wholly outside (below)
        [0.2, 0.2, 0.8, 0.8],  # kept: floors to the one pixel (0, 0)
        [W - 1, 5, W + 10, 15.5],  # kept: clipped to the last column
    ]
    with pytest.warns(DetectionsDroppedWarning, match="5 of 8 detections dropped"):
        detections = check(boxes, labels=[1, 2, 3, 1, 2, 3, 3, 2], scores=np.linspace(0, 1, 8), max_detections=8)
    assert detections.kept.tolist() == [0, 6, 7]
    np.testing.assert_array_equal(detections.boxes, [[10, 10, 20, 20], [0, 0, 0, 0], [W - 1, 5, W - 1, 15]])
    assert detections.labels.tolist() == [1, 3, 2]
    np.testing.assert_allclose(detections.scores, [0.0, 6 / 7, 1.0])
    assert detections.dropped == [(1, INVERTED), (2, INVERTED), (3, OUTSIDE), (4, OUTSIDE), (5, OUTSIDE)]
    assert detections.dropped[0].detection == 1 and detections.dropped[0].reason == INVERTED


def test_a_box_of_one_pixel_column_or_row_is_kept_whatever_its_fraction() -> None:
    # inclusive boxes: x1 == x2 is a one-pixel column, like the sub-pixel box that floors to it
    boxes = [[5, 5, 5, 15], [5.2, 5, 5.8, 15], [-10, 5, 0, 15], [5, -10, 15, 0]]
    detections = check(boxes, labels=[1, 1, 1, 1], scores=[0.5] * 4, max_detections=4)
    assert detections.kept.tolist() == [0, 1, 2, 3] and not detections.dropped
    np.testing.assert_array_equal(detections.boxes, [[5, 5, 5, 15], [5, 5, 5, 15], [0, 5, 0, 15], [5, 0, 15, 0]])


def test_the_drop_warning_points_at_the_caller() -> None:
    with pytest.warns(DetectionsDroppedWarning) as caught:
        check([[5, 5, 1, 1]])
    assert caught[0].filename == __file__ or Path(caught[0].filename).name == "test_inputs.py"


def test_float_labels_with_integral_values_are_accepted() -> None:
    detections = check([[1, 1, 5, 5], [2, 2, 6, 6]], labels=np.array([1.0, 3.0]), scores=[0.1, 0.2])
    assert detections.labels.dtype == np.int64 and detections.labels.tolist() == [1, 3]


@pytest.mark.parametrize(
    ("boxes", "labels", "scores", "argument", "words"),
    [
        ([[0, 0, 5]], [1], [0.5], "boxes", "shape"),
        ([0, 0, 5, 5], [1], [0.5], "boxes", "shape"),
        ([[[0, 0, 5, 5]]], [1], [0.5], "boxes", "shape"),
        ([[0, 0, np.nan, 5]], [1], [0.5], "boxes", "finite"),
        ([[0, -np.inf, 5, 5]], [1], [0.5], "boxes", "finite"),
        ([[0, 0, 5, 5]], [1], [np.nan], "scores", "finite"),
        ([[0, 0, 5, 5]], [1], [np.inf], "scores", "finite"),
        ([[0, 0, 5, 5]], [1], [1e300], "scores", "finite"),
        ([[0, 0, 5, 5], [1, 1, 4, 4]], [1, 1], [0.5, -0.1], "scores", "entries [1] are [-0.1"),
        ([[0, 0, 5, 5]], [0], [0.5], "labels", "1..3"),
        ([[0, 0, 5, 5]], [K + 1], [0.5], "labels", "1..3"),
        ([[0, 0, 5, 5]], [-1], [0.5], "labels", "1..3"),
        ([[0, 0, 5, 5]], [1.5], [0.5], "labels", "integers"),
        ([[0, 0, 5, 5]], [np.nan], [0.5], "labels", "integers"),
        ([[0, 0, 5, 5]], np.array([2**64 - 1], np.uint64), [0.5], "labels", "1..3"),
        ([[0, 0, 5, 5]], [True], [0.5], "labels", "real numbers"),
        ([[0, 0, 5, 5]], ["1"], [0.5], "labels", "real numbers"),
        ([["0", "0", "5", "5"]], [1], [0.5], "boxes", "real numbers"),
        ([[0, 0, 5, 5]], [1, 2], [0.5], "labels", "shape"),
        ([[0, 0, 5, 5]], [1], [0.5, 0.6], "scores", "shape"),
        ([[0, 0, 5, 5]], [[1]], [0.5], "labels", "shape"),
        ([[0, 0, 5, 5]], [1], 0.5, "scores", "shape"),
        ([[0, 0, 5, 5], [0, 0, 5]], [1, 1], [0.5, 0.5], "boxes", "array"),
        ([[0, 0, 5, None]], [1], [0.5], "boxes", "real numbers"),
        ([[0, 0, 5, 5j]], [1], [0.5], "boxes", "real numbers"),
        (None, [1], [0.5], "boxes", "got None"),
        ([[0, 0, 5, 5]], None, [0.5], "labels", "got None"),
        ([[0, 0, 5, 5]], [1], None, "scores", "got None"),
        ([[0, 0, 5, 5]], [1], np.ma.masked_less([0.5], 0.6), "scores", "masked array"),
    ],
)
def test_bad_detections_raise_naming_the_argument(boxes, labels, scores, argument: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError, match=argument) as raised:
        check_detections(boxes, labels, scores, height=H, width=W, num_classes=K, max_detections=LIMIT)
    assert words in str(raised.value)


def test_scores_above_the_ceiling_are_refused_as_the_model_reads_them() -> None:
    boxes = np.tile([0, 0, 5, 5], (12, 1))
    scores = np.full(12, 87.0)
    with pytest.raises(InvalidArgumentError, match=r"scores must be at most 1, the model's score ceiling .*: "
                                                   r"entries \[0, 1, 2, 3, 4, 5, 6, 7\] and 4 more are above it, "
                                                   r"the largest 87"):
        check(boxes, scores=scores, score_ceiling=1.0, max_detections=None)
    assert len(check(boxes, scores=scores, max_detections=None)) == 12  # no ceiling: training data
    assert len(check(boxes[:8], scores=np.ones(8), score_ceiling=1.0)) == 8
    # a float32 ceiling of 0.9 lies below the float64 0.9: the model reads the score as float32
    assert len(check(boxes[:8], scores=np.full(8, 0.9), score_ceiling=float(np.float32(0.9)))) == 8
    with pytest.raises(InvalidArgumentError, match="entries \\[3\\] are above it"):
        check(boxes[:8], scores=np.where(np.arange(8) == 3, np.nextafter(np.float32(0.9), 1), 0.5),
              score_ceiling=float(np.float32(0.9)))


def test_more_detections_than_the_model_takes_raise_its_limit() -> None:
    boxes = np.tile([0, 0, 5, 5], (LIMIT + 1, 1))
    with pytest.raises(InvalidArgumentError, match=f"limit of {LIMIT}"):
        check(boxes)
    assert len(check(boxes[:LIMIT])) == LIMIT
    assert len(check(boxes, max_detections=None)) == len(boxes)  # no limit: training data


@pytest.mark.parametrize("ceiling", [float("nan"), "1", -1.0, 0.0, True, 1e39])
def test_a_score_ceiling_that_is_no_positive_float32_is_named(ceiling) -> None:
    with pytest.raises(InvalidArgumentError, match="score_ceiling must be a number > 0"):
        check([[0, 0, 5, 5]], score_ceiling=ceiling)


@pytest.mark.parametrize("option", ["height", "width", "num_classes", "max_detections"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_bad_sizes_and_limits_are_named(option: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=option):
        check([[0, 0, 5, 5]], **{option: value})


# --------------------------------------------------------------------------------------------- fuzz

_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8, np.uint64, np.float16, bool])
_values = st.one_of(
    hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)),
    st.lists(st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.none()), max_size=6),
    st.lists(st.lists(st.floats(-100, 200), min_size=4, max_size=4), max_size=6),
    st.none(),
    st.text(max_size=3),
)


def _box_rows(count: int) -> st.SearchStrategy:
    coordinate = st.one_of(st.floats(-100, 200), st.integers(-100, 200), st.sampled_from([np.nan, np.inf, -0.0]))
    return st.lists(st.lists(coordinate, min_size=4, max_size=4), min_size=count, max_size=count)


@st.composite
def _detections(draw) -> tuple[object, object, object]:
    """Mostly well-shaped detections with wild values, sometimes anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(_values), draw(_values), draw(_values)
    count = draw(st.integers(0, LIMIT + 1))
    boxes = draw(_box_rows(count))
    labels = draw(st.lists(st.one_of(st.integers(-2, K + 2), st.floats(-2, K + 2)), min_size=count, max_size=count))
    scores = draw(st.lists(st.floats(), min_size=count, max_size=count))
    return boxes, labels, scores


def _assert_valid(detections: Detections, count: int, height: int, width: int) -> None:
    kept = len(detections)
    assert detections.boxes.shape == (kept, 4) and detections.boxes.dtype == np.float32
    assert detections.labels.shape == (kept,) and detections.labels.dtype == np.int64
    assert detections.scores.shape == (kept,) and detections.scores.dtype == np.float32
    assert detections.kept.dtype == np.int64
    boxes = detections.boxes
    assert (boxes == np.floor(boxes)).all()
    assert (0 <= boxes[:, 0]).all() and (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 2] <= width - 1).all()
    assert (0 <= boxes[:, 1]).all() and (boxes[:, 1] <= boxes[:, 3]).all() and (boxes[:, 3] <= height - 1).all()
    assert ((1 <= detections.labels) & (detections.labels <= K)).all()
    assert np.isfinite(detections.scores).all()
    dropped = [d.detection for d in detections.dropped]
    assert sorted(detections.kept.tolist() + dropped) == list(range(count))


@_FUZZ
@given(_detections(), st.integers(1, 50), st.integers(1, 50))
def test_fuzzed_detections_raise_only_invalid_argument_and_never_come_back_invalid(
    arguments: tuple[object, object, object], height: int, width: int
) -> None:
    boxes, labels, scores = arguments
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy overflow or invalid-value warnings would be bugs
        warnings.simplefilter("ignore", DetectionsDroppedWarning)  # (added last: checked first)
        try:
            detections = check_detections(boxes, labels, scores, height=height, width=width,
                                          num_classes=K, max_detections=LIMIT)
        except InvalidArgumentError:
            return
    _assert_valid(detections, np.asarray(boxes).shape[0], height, width)


@_FUZZ
@given(st.one_of(
    hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.float32, np.int64, bool]),
               hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
    _values,
))
def test_fuzzed_images_raise_only_invalid_argument_and_never_come_back_invalid(image: object) -> None:
    try:
        loaded = load_image(image)
    except InvalidArgumentError:
        return
    assert loaded.dtype == np.uint8 and loaded.ndim == 3 and loaded.shape[2] == 3
    assert loaded.shape[0] > 0 and loaded.shape[1] > 0 and loaded.flags.c_contiguous


@st.composite
def _valid_detections(draw) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """An image size and up to LIMIT detections that are valid by construction: integer boxes inside the
    image with x1 <= x2 and y1 <= y2, labels in 1..K, scores in [0, 1]."""
    height, width = draw(st.integers(1, 50)), draw(st.integers(1, 50))
    count = draw(st.integers(0, LIMIT))
    xs = np.sort(draw(hnp.arrays(np.int64, (count, 2), elements=st.integers(0, width - 1))), axis=1)
    ys = np.sort(draw(hnp.arrays(np.int64, (count, 2), elements=st.integers(0, height - 1))), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32).reshape(-1, 4)
    labels = draw(hnp.arrays(np.int64, count, elements=st.integers(1, K)))
    scores = draw(hnp.arrays(np.float32, count, elements=st.floats(0, 1, width=32)))
    return height, width, boxes, labels, scores


@_FUZZ
@given(_valid_detections())
def test_valid_detections_are_all_kept_unchanged(case: tuple[int, int, np.ndarray, np.ndarray, np.ndarray]) -> None:
    # the fuzz tests above return early on a refusal: this one holds the checks to accepting what is valid
    height, width, boxes, labels, scores = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to drop, nothing to warn about
        detections = check_detections(boxes, labels, scores, height=height, width=width, num_classes=K,
                                      max_detections=LIMIT)
    assert detections.kept.tolist() == list(range(len(boxes))) and not detections.dropped
    np.testing.assert_array_equal(detections.boxes, boxes)
    np.testing.assert_array_equal(detections.labels, labels)
    np.testing.assert_array_equal(detections.scores, scores)


@_FUZZ
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6).map(
    lambda shape: (shape[0], shape[1], 3))))
def test_valid_rgb_images_load_unchanged(image: np.ndarray) -> None:
    np.testing.assert_array_equal(load_image(image), image)


H_EDGE, W_EDGE, K_EDGE = 40, 60, 3


def test_a_box_starting_inside_the_last_pixel_is_kept():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = check_detections([[W_EDGE - 0.5, 5, W_EDGE + 3, 10], [3, H_EDGE - 0.25, 8, H_EDGE + 2]], [1, 1], [0.5, 0.5],
                             height=H_EDGE, width=W_EDGE, num_classes=K_EDGE, max_detections=8)
    assert d.kept.tolist() == [0, 1]
    np.testing.assert_array_equal(d.boxes, [[W_EDGE - 1, 5, W_EDGE - 1, 10], [3, H_EDGE - 1, 8, H_EDGE - 1]])


def test_a_box_inverted_within_one_pixel_is_dropped_as_inverted() -> None:
    boxes = [[5.8, 5, 5.2, 15], [5, 9.9, 15, 9.1], [5.2, 5, 5.8, 15]]  # x inverted, y inverted, kept
    with pytest.warns(DetectionsDroppedWarning, match="2 of 3 detections dropped"):
        detections = check_detections(boxes, [1, 1, 1], [0.5] * 3, height=40, width=50, num_classes=3)
    assert detections.kept.tolist() == [2]
    assert detections.dropped == [(0, INVERTED), (1, INVERTED)]
    np.testing.assert_array_equal(detections.boxes, [[5, 5, 5, 15]])


def test_an_unknown_sample_is_refused_naming_the_samples() -> None:
    with pytest.raises(InvalidArgumentError, match="^name must be one of coffee, chelsea, astronaut, got 'nope'$"):
        samples.load("nope")
