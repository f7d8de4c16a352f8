"""``fcnpipe demo`` in a real terminal (tmux): live progress bars that move, drawn in place.

The demo's output to a file (no terminal) is checked in ``test_cli.py``; here the same
command runs in a tmux pane, on a budget where training takes several steps and
segmentation two batches, and the test reads the screen while it runs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.cli import FCNPIPE
from tests.terminal import Pane, ensure_tmux

pytestmark = pytest.mark.e2e

BAR = re.compile(r"^(?P<stage>decoding|training|segmenting) +\S+ +(?P<percent>\d{1,3})% ")


def test_demo_draws_live_bars_that_move(tmp_path: Path) -> None:
    tmux = ensure_tmux()
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    command = [
        FCNPIPE, "demo", "--workdir", str(tmp_path / "demo"),
        "--num-images", "80", "--size", "48", "--epochs", "2",
    ]  # fmt: skip
    seen: dict[str, list[int]] = {"decoding": [], "training": [], "segmenting": []}
    with Pane(tmux, command, env, width=160, height=50) as pane:
        deadline = time.monotonic() + 540
        while (status := pane.exit_status()) is None:
            assert time.monotonic() < deadline, "\n".join(pane.screen(history=True)[-40:])
            for line in pane.screen():
                if bar := BAR.match(line):
                    percents = seen[bar["stage"]]
                    if not percents or percents[-1] != int(bar["percent"]):
                        percents.append(int(bar["percent"]))
            time.sleep(0.2)
        history = pane.screen(history=True)
    assert status == 0, "\n".join(history[-40:])
    # Each bar was seen under way, then moved on to 100 %.
    for stage in ("training", "segmenting"):
        assert len(seen[stage]) >= 2 and seen[stage][0] < 100 == seen[stage][-1], (
            seen,
            [line for line in history if "epoch" in line],
        )
    assert seen["training"] == sorted(seen["training"]), seen  # forward only
    # Drawn in place: one line per stage is left on the screen, not one per update.
    bars = [line for line in history if BAR.match(line)]
    assert [BAR.match(line)["stage"] for line in bars] == [  # type: ignore[index]
        "decoding",
        "training",
        "segmenting",
    ], bars
    assert all("100%" in line for line in bars), bars
    text = "\n".join(history)
    assert "(RayTrainWorker" not in text and "INFO" not in text, text
