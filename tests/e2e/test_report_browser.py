"""The HTML report of ``fcnpipe report --html`` as a browser shows it: headless Chromium.

Checks what a reader sees, not just the markup: the charts and overlays render as non-blank
regions in the colours they are drawn with, every image decodes, and each overlay shows
the run's own pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import Browser, Chromium, chromium_session, ensure_chromium
from tests.cli import fcnpipe
from tests.results import SEGMENT_RUN, BuiltResults, build_results

pytestmark = pytest.mark.e2e

SIZE = 64
BAR_BLUE = (0x4E, 0x79, 0xA7)  # the bar and loss-curve colour of pipeline.report
CURVE_GREEN = (0x59, 0xA1, 0x4F)  # the val mean IoU curve


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    """Chromium and chromedriver (installed with apt-get where absent)."""
    return ensure_chromium()


@pytest.fixture
def report(tmp_path: Path) -> tuple[BuiltResults, Path]:
    built = build_results(str(tmp_path / "results"), size=SIZE)
    path = tmp_path / "report.html"
    result = fcnpipe("report", built.out, SEGMENT_RUN, "--html", str(path), "--images", "2")
    assert result.returncode == 0, result.stderr
    return built, path


@pytest.fixture
def browser(chromium: Chromium, tmp_path: Path) -> Iterator[Browser]:
    with chromium_session(tmp_path / "browser", chromium) as session:
        yield session


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _share_of(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> float:
    close = np.abs(pixels.astype(np.int16) - np.array(colour)).max(axis=-1) <= tolerance
    return float(close.mean())


def _assert_not_blank(name: str, pixels: np.ndarray) -> None:
    height, width = pixels.shape[:2]
    assert height >= 40 and width >= 40, f"{name}: region is {width}x{height} px"
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours >= 8, f"{name}: {colours} distinct colours, looks blank"
    assert pixels.std() > 10, f"{name}: nearly uniform (std {pixels.std():.1f})"


def test_report_renders_charts_and_overlays(
    report: tuple[BuiltResults, Path], browser: Browser, tmp_path: Path
) -> None:
    built, path = report
    browser.get(path.as_uri())
    assert browser.title() == f"fcnpipe report: {SEGMENT_RUN}"

    chart = _pixels(browser.element_screenshot(browser.find("#class-iou-chart")))
    _assert_not_blank("class IoU chart", chart)
    assert _share_of(chart, BAR_BLUE) > 0.02, "no bars drawn in the class IoU chart"

    curves = _pixels(browser.element_screenshot(browser.find("#training-curves")))
    _assert_not_blank("training curves", curves)
    assert _share_of(curves, BAR_BLUE) > 0.001, "no train loss curve"
    assert _share_of(curves, CURVE_GREEN) > 0.001, "no val mean IoU curve"

    figures = browser.find_all("figure.overlay")
    ids = [
        browser.execute("return arguments[0].dataset.imageId;", browser.element_arg(f))
        for f in figures
    ]
    assert len(ids) == 4 and ids[2:] == [built.wrong, built.half]
    images = browser.find_all("figure.overlay img")
    for image_id, element in zip(ids, images, strict=True):
        shot = _pixels(browser.element_screenshot(element))
        _assert_not_blank(f"overlay {image_id}", shot)
        # The image is drawn 3x with nearest-neighbour scaling inside a 1 px border: its
        # left third is the photo itself.
        rect = browser.rect(element)
        scale = round((rect["width"] - 2) / (3 * SIZE))
        assert scale >= 1
        middle = 1 + scale // 2  # the centre of each drawn pixel, past the border
        drawn = shot[middle : SIZE * scale : scale, middle : SIZE * scale : scale]
        photo = np.asarray(
            Image.open(Path(built.dataset) / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        )
        assert drawn.shape == photo.shape
        assert np.abs(drawn.astype(int) - photo.astype(int)).mean() < 4, image_id

    loaded = browser.execute(
        "return Array.from(document.images)"
        ".map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    assert len(loaded) == 4
    assert all(complete and w == 3 * SIZE and h == SIZE for complete, w, h in loaded), loaded
