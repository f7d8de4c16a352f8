"""Progress in the Prefect UI: a progress artifact per stage of a run, kept up to date.

:class:`ArtifactProgress` is a progress sink (:mod:`pipeline.progress`): the first update of a
stage creates the artifact ``fcnpipe-<run id>-<stage>`` (``decoding``, ``training``,
``segmenting``) in the current task run, later ones update its percentage and description at
most every few seconds, and the stage's last update always. The pipeline jobs know nothing
of Prefect: the flows hand this sink to them (an embedded run) or feed it the progress lines
of a Ray Job's log (a cluster run).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.progress import Update

__all__ = ["ArtifactProgress", "artifact_key"]

logger = logging.getLogger(__name__)


def artifact_key(run_id: str) -> str:
    """The Prefect artifact key of a run (lowercase letters, digits and dashes)."""
    return "fcnpipe-" + re.sub(r"[^a-z0-9-]+", "-", run_id.lower())


class ArtifactProgress:
    """Prefect progress artifacts of one run, one per stage.

    Prefect API calls are made from whichever thread reports progress (the training
    driver's polling thread carries the task run's context, so the artifact belongs to the
    task run); a failed call is logged, never raised: the UI's progress must not fail a run.

    Args:
        run_id: The run whose stages these are.
        every_s: Least seconds between two updates of one artifact.
    """

    def __init__(
        self, run_id: str, *, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.run_id = run_id
        self.every_s = every_s
        self.clock = clock
        self._artifacts: dict[str, Any] = {}  # stage -> artifact id
        self._last: dict[str, float] = {}
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def update(self, update: Update) -> None:
        """Create or update the stage's artifact, if due."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        stage = update.stage
        percent = 100.0 if update.finished else round(100 * update.fraction, 1)
        description = f"{stage} of run {self.run_id}: {update.text}"
        now = self.clock()
        with self._lock:
            if stage in self._done:
                return
            try:
                if stage not in self._artifacts:
                    self._artifacts[stage] = create_progress_artifact(
                        percent,
                        key=f"{artifact_key(self.run_id)}-{stage}",
                        description=description,
                    )
                elif update.finished or now - self._last.get(stage, 0.0) >= self.every_s:
                    update_progress_artifact(self._artifacts[stage], percent, description)
                else:
                    return
            except Exception:
                logger.warning("Prefect progress artifact of %s not updated", stage, exc_info=True)
                return
            self._last[stage] = now
            if update.finished:
                self._done.add(stage)
