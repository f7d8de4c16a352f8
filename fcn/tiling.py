"""Overlapping windows over a large image, and the weights that blend their scores.

Along each axis an image of length ``L`` is cut into windows of ``tile`` pixels that start
every ``tile - overlap`` pixels; the last window ends at ``L`` (it is shorter, or, where that
would leave a sliver under half a tile, the window before it is longer, up to 1.5 tiles, and
takes its place). Every pair of neighbours shares exactly ``overlap`` pixels, and no pixel lies in
more than two windows per axis (``overlap <= tile / 2``).

A window's weight along an axis ramps from ``0.5 / overlap`` to ``1 - 0.5 / overlap``
across each edge it shares with a neighbour, and is 1 elsewhere (also at the image's own
edges). The two ramps of a shared strip sum to 1 at every pixel, so the blend of the
windows' scores, ``sum(w_i * s_i)``, needs no normalisation, and its arg-max is the label
map; in a 2-D corner the four products of ramps sum to 1 as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Window", "axis_windows", "check_tiling", "ramp"]


@dataclass(frozen=True)
class Window:
    """One window along an axis: ``[start, stop)``, and what it shares with neighbours."""

    start: int
    stop: int
    lead: int
    """Pixels shared with the previous window (0 for the first)."""
    trail: int
    """Pixels shared with the next window (0 for the last)."""

    @property
    def length(self) -> int:
        """``stop - start``."""
        return self.stop - self.start


def check_tiling(tile: int, overlap: int) -> None:
    """Raise ValueError unless ``0 <= overlap <= tile / 2`` and ``tile >= 32``."""
    if tile < 32:
        raise ValueError(f"tile must be >= 32 pixels, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be between 0 and tile / 2 ({tile // 2}), got {overlap}")


def axis_windows(length: int, tile: int, overlap: int) -> list[Window]:
    """The windows along an axis of ``length`` pixels (one window if it fits a tile).

    Args:
        length: Pixels along the axis.
        tile: Window length.
        overlap: Pixels neighbours share.
    """
    check_tiling(tile, overlap)
    if length <= tile:
        return [Window(0, length, 0, 0)]
    stride = tile - overlap
    count = -(-(length - tile) // stride) + 1
    starts = [i * stride for i in range(count)]
    stops = [start + tile for start in starts]
    stops[-1] = length
    if stops[-1] - starts[-1] < tile // 2:
        # A sliver: the window before takes its place (a bit longer than a tile).
        starts.pop()
        stops.pop()
        stops[-1] = length
    shared = [stops[i] - starts[i + 1] for i in range(len(starts) - 1)]
    return [
        Window(start, stop, shared[i - 1] if i else 0, shared[i] if i < len(shared) else 0)
        for i, (start, stop) in enumerate(zip(starts, stops, strict=True))
    ]


def ramp(window: Window) -> np.ndarray:
    """The window's blending weights along the axis (float32, ``window.length`` values)."""
    weights = np.ones(window.length, np.float32)
    if window.lead:
        weights[: window.lead] = (np.arange(window.lead, dtype=np.float32) + 0.5) / window.lead
    if window.trail:
        weights[window.length - window.trail :] = (
            np.arange(window.trail, 0, -1, dtype=np.float32) - 0.5
        ) / window.trail
    return weights
