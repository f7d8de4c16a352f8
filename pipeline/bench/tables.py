"""``fcnpipe bench tables``: how many images/s one driver can take in, before and after the
Iceberg tables moved the data files to the workers.

Usage:
    fcnpipe bench tables [--num-images 4000 --size 384 --rows-per-file 500 --actor-rate 300]

Synthetic segmentation output (what the inference actors return: a label-map PNG per image,
per-class counts, VOC's 21 classes) is made once and put in Ray's object store, so the
producers are infinitely fast and the consumer is measured alone. Then:

- (a) the single-driver design as it was before the Iceberg tables: the driver iterates the
  actors' rows, label maps included, splits them into ``predictions``, ``class_metrics`` and
  ``errors`` rows (:func:`old_split_rows`, the old driver's row loop, kept here to measure it)
  and writes every data file itself (``TableWriter`` in the driver process);
- (b) this design: Ray Data write tasks (:func:`pipeline.segment.write.write_batch`) write the
  files beside the actors, and the driver iterates a row of counts per file.

Each then ends the run as the segmentation driver does (per-class totals and counts read back
from the files, the ``runs`` row, one Iceberg commit). The driver's *ceiling* is the images it
takes in per second of its own time: in (a) the driver is never idle (the rows are
ready, and every write blocks it), so its time is the stream's wall time; in (b) it waits for
the workers, and its own time is the CPU time of its process (its Ray Data threads included).
Divided by one actor's rate (``--actor-rate``, e.g. a GPU actor's few hundred images/s), the
ceiling is the cluster size at which each design stops scaling.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.plan import WRITE_CPUS
from pipeline.segment.actor import COUNTS, SEGMENT_OUTPUT
from pipeline.segment.write import MAX_FILE_BYTES, WritePlan, write_batch
from pipeline.storage import join
from pipeline.store.files import TableWriter

__all__ = ["bench_tables", "cpu_model", "format_bench_tables", "synthetic_output"]

NUM_CLASSES = 21
_DISTINCT = 32  # distinct label maps, cycled


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (or /proc/cpuinfo's, or "unknown")."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def synthetic_output(num_images: int, size: int, *, seed: int = 0) -> pa.Table:
    """``num_images`` rows of :data:`~pipeline.segment.actor.SEGMENT_OUTPUT`: label maps of
    ``size`` x ``size`` (a few shapes of random classes on background) with ground-truth counts
    from a shifted copy, one error row in 50."""
    from fcn.palette import encode_label_png

    rng = np.random.default_rng(seed)
    samples = []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(_DISTINCT):
        label = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(2, 6))):
            cy, cx = rng.integers(0, size, 2).tolist()
            r = int(rng.integers(size // 10, size // 3))
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, NUM_CLASSES)
        truth = np.roll(label, 3, axis=1)
        confusion = np.bincount(
            truth.ravel().astype(np.int64) * NUM_CLASSES + label.ravel(),
            minlength=NUM_CLASSES**2,
        ).reshape(NUM_CLASSES, NUM_CLASSES)
        inter = np.diag(confusion)
        gt, pred = confusion.sum(1), confusion.sum(0)
        samples.append(
            {
                "label_map": encode_label_png(label),
                "class_pixel_counts": pred.tolist(),
                "gt_pixels": gt.tolist(),
                "pred_pixels": pred.tolist(),
                "intersection": inter.tolist(),
                "union": (gt + pred - inter).tolist(),
            }
        )
    rows: dict[str, list[Any]] = {name: [] for name in SEGMENT_OUTPUT.names}
    for i in range(num_images):
        failed = i % 50 == 49
        sample = samples[i % _DISTINCT]
        values: dict[str, Any] = {
            "image_id": f"img{i:08d}",
            "image_uri": f"s3://bucket/images/img{i:08d}.jpg",
            "height": None if failed else size,
            "width": None if failed else size,
            "latency_ms": None if failed else 3.0,
            "stage": "decode_image" if failed else None,
            "error_type": "UnidentifiedImageError" if failed else None,
            "message": "cannot identify image file" if failed else None,
            "engine": None if failed else "openvino 2026.4.1",
            "precision": None if failed else "bf16",
            "channels_last": None,
        }
        for name in ("label_map", "class_pixel_counts", *COUNTS):
            values[name] = None if failed else sample[name]
        for name in SEGMENT_OUTPUT.names:
            rows[name].append(values.get(name))  # strip, strips, label_map_uri: null
    return pa.table(rows, schema=SEGMENT_OUTPUT)


def bench_tables(
    *,
    num_images: int = 4000,
    size: int = 384,
    rows_per_file: int = 500,
    actor_rate: float = 300.0,
    actor_batch: int = 8,
    root: str,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure the driver's ceiling with the single-driver design and with this one.

    Args:
        num_images: Synthetic images of each run.
        size: Their side (label maps ``size`` x ``size``).
        rows_per_file: Images per data file (``--rows-per-file``).
        actor_rate: One actor's images/s, to turn the ceilings into cluster sizes.
        actor_batch: Rows per block, as an actor returns them.
        root: Scratch output root (local directory or ``s3://`` prefix).
        echo: Where progress lines go.
    """
    import ray

    from pipeline.cluster import ensure_ray

    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():  # only a Ray this call starts is this call's to stop
            stack.callback(ray.shutdown)
        ensure_ray()
        ray.data.DataContext.get_current().enable_progress_bars = False
        echo(f"making {num_images} synthetic rows of {size} px label maps ...")
        table = synthetic_output(num_images, size)
        label_mb = sum(len(b) for b in table["label_map"].to_pylist() if b) / 1e6
        blocks = [table.slice(i, actor_batch) for i in range(0, num_images, actor_batch)]
        rows = ray.data.from_arrow(blocks).materialize()  # the actors' output, ready
        out = join(root, "out")
        echo("(a) single driver, as before: the old row loop, every file written by the driver")
        old = _measure(
            lambda run: _driver_writes(rows, run, rows_per_file, old_split_rows), out, "before"
        )
        echo("(b) workers write the files, the driver commits")
        after = _measure(lambda run: _workers_write(rows, run, rows_per_file), out, "after")
    result: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "num_images": num_images,
        "size": size,
        "rows_per_file": rows_per_file,
        "label_mb": label_mb,
        "actor_rate": actor_rate,
        "source": "s3" if root.startswith("s3://") else "local",
        "write_cpus": WRITE_CPUS,
    }
    for name, figures in (("before", old), ("after", after)):
        busy = figures["driver_cpu_s"] if name == "after" else figures["stream_s"]
        ceiling = num_images / busy
        result[name] = {
            **figures,
            "ceiling": ceiling,
            "ceiling_mb_s": label_mb * ceiling / num_images,
            "saturates_at": ceiling / actor_rate,
            "wall_rate": num_images / figures["stream_s"],
        }
    return result


def _measure(stream: Callable[[Any], None], out: str, run_id: str) -> dict[str, float]:
    """Stream a run's rows (driver CPU and wall time), then commit it (wall time)."""
    from pipeline.store.runs import RunWriter
    from pipeline.tables import runs_row

    run = RunWriter(out, run_id, "segment", overwrite=True)
    started = datetime.now(UTC)
    cpu, wall = time.process_time(), time.perf_counter()
    stream(run)
    driver_cpu, stream_s = time.process_time() - cpu, time.perf_counter() - wall
    began = time.perf_counter()
    # The end of a run, as the segmentation driver does it: per-class totals and counts read
    # back from every data file of the run, the runs row, the commit.
    totals = {name: np.zeros(NUM_CLASSES, np.int64) for name in COUNTS}
    for part in run.iter_written("class_metrics", ["class_id", *COUNTS]):
        for name in COUNTS:
            np.add.at(totals[name], part["class_id"].to_numpy(), part[name].to_numpy())
    images = sum(p.num_rows for p in run.iter_written("predictions", ["image_id"]))
    errors = sum(p.num_rows for p in run.iter_written("errors", ["image_uri"]))
    run.write(
        "runs",
        [
            runs_row(
                kind="segment",
                input_uri="s3://bucket/images",
                model_uri="s3://models/m",
                num_images=images,
                num_errors=errors,
                scores=None,
                class_names=[f"class{i}" for i in range(NUM_CLASSES)],
                started_at=started,
                finished_at=datetime.now(UTC),
                images_per_s=None,
            )
        ],
    )
    result = run.commit()
    return {
        "driver_cpu_s": driver_cpu,
        "stream_s": stream_s,
        "commit_s": time.perf_counter() - began,
        "files": sum(len(f) for f in result.files.values()),
    }


def _driver_writes(
    rows: Any,
    run: Any,
    rows_per_file: int,
    split: Callable[[pa.Table, Sequence[str], str], dict[str, pa.Table]],
) -> None:
    """The single-driver design: every row through the driver, every file written by it."""
    names = tuple(f"class{i}" for i in range(NUM_CLASSES))
    writers = {
        t: TableWriter(run.target(t), writer_id="driver", max_rows=2**62, max_bytes=MAX_FILE_BYTES)
        for t in _ORDER
    }
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        for table, data in split(pa.table(batch), names, "s3://models/m").items():
            if data.num_rows:
                writers[table].write(data)
        if writers["predictions"].buffered_rows >= rows_per_file:
            for table in _ORDER:
                writers[table].flush()
    for table in _ORDER:
        writers[table].close()


def _workers_write(rows: Any, run: Any, rows_per_file: int) -> None:
    """This design: write tasks beside the actors; the driver reads a row of counts per file."""
    plan = WritePlan(
        targets={t: run.target(t) for t in _ORDER},
        class_names=tuple(f"class{i}" for i in range(NUM_CLASSES)),
        model_uri="s3://models/m",
    )
    written = rows.map_batches(
        functools.partial(write_batch, plan=plan),
        batch_format="pyarrow",
        batch_size=rows_per_file,
        num_cpus=WRITE_CPUS,
    )
    for _ in written.iter_batches(batch_format="pyarrow", batch_size=None):
        pass


_ORDER = ("class_metrics", "errors", "predictions")


def old_split_rows(batch: pa.Table, class_names: Sequence[str], model: str) -> dict[str, pa.Table]:
    """The single-driver design's split, as its driver ran it: a Python loop over every image
    and class (kept to measure that design; :func:`pipeline.segment.write.split_rows` is what
    runs now)."""
    failed = batch["stage"].is_valid()
    errors = batch.filter(failed).select(["image_id", "image_uri", "stage", "error_type"])
    errors = errors.append_column("message", batch.filter(failed)["message"])
    good = batch.filter(pc.invert(failed))
    kept = ["image_id", "image_uri", "height", "width", "label_map", "class_pixel_counts"]
    predictions = good.select([*kept, "latency_ms"]).append_column(
        "model_uri", pa.array([model] * good.num_rows, pa.string())
    )
    scored = good.filter(good["gt_pixels"].is_valid())
    names = ("image_id", "class_id", "class_name", *COUNTS, "iou")
    rows: dict[str, list[Any]] = {name: [] for name in names}
    for row in scored.select(["image_id", *COUNTS]).to_pylist():
        for class_id, (gt, pred, inter, union) in enumerate(
            zip(*(row[n] for n in COUNTS), strict=True)
        ):
            if gt == 0 and pred == 0:
                continue  # only classes present in the ground truth or the prediction
            values = (
                row["image_id"],
                class_id,
                class_names[class_id],
                gt,
                pred,
                inter,
                union,
                inter / union if union else None,
            )
            for name, value in zip(names, values, strict=True):
                rows[name].append(value)
    return {"predictions": predictions, "class_metrics": pa.table(rows), "errors": errors}


def format_bench_tables(result: dict[str, Any]) -> str:
    """The figures as a few aligned lines."""
    per_image_kb = result["label_mb"] / result["num_images"] * 1e3
    a, b = result["before"], result["after"]

    def row(label: str, key: str, fmt: str) -> str:
        return f"{label:<34}{a[key]:>20{fmt}}{b[key]:>18{fmt}}"

    return "\n".join(
        [
            f"CPU: {result['cpu']} ({result['cores']} cores); {result['num_images']} images, "
            f"label maps {result['size']} px ({per_image_kb:.1f} kB of PNG each), "
            f"{result['rows_per_file']} per file, tables on {result['source']}",
            f"{'':<34}{'(a) driver writes':>20}{'(b) workers write':>18}",
            row("stream wall s", "stream_s", ".2f"),
            row("driver CPU s during the stream", "driver_cpu_s", ".2f"),
            row("driver ceiling, images/s", "ceiling", ".0f"),
            row("driver ceiling, MB/s of PNG", "ceiling_mb_s", ".1f"),
            row("end of run (totals, commit) s", "commit_s", ".2f"),
            row(f"saturates at N actors of {result['actor_rate']:.0f}/s", "saturates_at", ".1f"),
            f"ceiling b/a: {b['ceiling'] / a['ceiling']:.1f}x (the driver's time: (a) the "
            "stream's wall time, it is never idle; (b) its CPU time, it waits for the workers)",
        ]
    )
