"""Titled panels: the header sits above unchanged images, each title inside its column."""

from __future__ import annotations

import numpy as np
import pytest

from camseg.utils.overlay import header, panel, pseudo_overlay


def _images(widths: list[int], h: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for w in widths]


def test_titles_add_a_header_above_the_untouched_panel() -> None:
    images = _images([96, 128, 96])
    plain = panel(*images)
    titled = panel(*images, titles=["image", "CAM", "truth"])
    extra = titled.shape[0] - plain.shape[0]
    assert extra > 0 and titled.shape[1] == plain.shape[1]
    np.testing.assert_array_equal(titled[extra:], plain)
    # Every column's title is drawn (white text on black) and none spills into a gap.
    strip = titled[:extra].max(axis=2)
    x0 = 0
    for w in (96, 128, 96):
        assert strip[:, x0 : x0 + w].max() > 128
        x0 += w
        if x0 < strip.shape[1]:
            assert strip[:, x0 : x0 + 4].max() == 0, "text in the gap between columns"
            x0 += 4


def test_a_long_title_is_shrunk_into_its_column() -> None:
    strip = header(["a very long title for such a narrow column", "x"], [48, 48], gap=4)
    text = strip.max(axis=2) > 0
    cols = np.flatnonzero(text.any(axis=0))
    assert cols.min() >= 0 and cols[cols < 50].max() < 48  # first title stays in its 48 px
    assert not text[:, 48:52].any()


def test_titles_must_match_the_images() -> None:
    with pytest.raises(ValueError, match="2 titles for 3 images"):
        panel(*_images([32, 32, 32]), titles=["a", "b"])


def test_pseudo_overlay_is_three_titled_columns() -> None:
    image = np.full((64, 64), 100, np.uint8)
    cam = np.zeros((64, 64), np.float32)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    out = pseudo_overlay(image, cam, mask, gt=mask)
    assert out.shape[1] == 3 * 64 + 2 * 4 and out.shape[0] > 64
    body = out[out.shape[0] - 64 :]
    right = body[:, 2 * 68 :]
    # The ground truth is drawn last, in yellow, over the identical pseudo-mask contour.
    assert (right[20, 20:40] == [255, 255, 0]).all()


def test_stack_pads_narrower_rows_and_keeps_every_pixel() -> None:
    from camseg.utils.overlay import stack

    wide, narrow = _images([80], h=10)[0], _images([50], h=6)[0]
    out = stack(wide, narrow, gap=2)
    assert out.shape == (10 + 2 + 6, 80, 3)
    np.testing.assert_array_equal(out[:10], wide)
    assert not out[10:12].any()  # the gap
    np.testing.assert_array_equal(out[12:, :50], narrow)
    assert not out[12:, 50:].any()  # the padding
