"""Sizing the jobs from the cluster: actors, ranks, threads, batches and memory.

Every ``auto`` field of a job's scaling section is filled here, from what the Ray cluster
offers: :func:`plan_segment` and :func:`plan_train` are pure functions (resources in, plan
out; the tests call them with made-up clusters), :func:`detect_resources` reads a live
cluster and :func:`model_footprint` a model's memory. A field set explicitly always wins.

The rules, and the measurements they stand on (2-core AMD EPYC, README "Sizing"):

- Segmentation is bound by the model. Reading and decoding an image costs a few percent of
  the model's time on it (a 4.7 MP JPEG: 13 ms to decode, 455 ms for FCN-8s ResNet-18 in
  bf16 with 2 threads; a 512 px PNG: 7.5 ms against 15-27 ms). So read tasks ask for a
  quarter CPU each (:data:`READ_CPUS`) and each node keeps an eighth of its CPUs, at least
  one read task's worth, for them (:data:`READ_SHARE`): enough for reads to stay ahead on
  nodes of any size, while the actors get the rest. A node's actors are at most
  :data:`MAX_ACTOR_CPUS` CPUs each (an actor of 32 torch threads scales worse than four of
  8), with as many threads as their CPUs rounded up: the read share is time-shared.
  The tasks that write the result tables' data files (:data:`WRITE_CPUS`) take turns with
  the reads in that share: at most a read task's CPUs, so one always fits beside the actors.
- On GPU nodes: one actor per GPU (``gpus_per_actor`` shares them), one CPU each.
- An actor declares the memory it needs to Ray (:meth:`ModelFootprint.actor_bytes`): a
  fixed part (the runtime and the model's weights) plus the activations of one batch of
  the pixel budget (:data:`DEFAULT_BATCH_PIXELS`; the actor never stacks more pixels than
  that, an image over the budget runs alone). Where a node's memory cannot hold an actor at
  the default budget, the budget shrinks to fit, down to :data:`MIN_BATCH_PIXELS`.
- Training on CPU nodes: one rank per node, with as many torch threads as the node has
  CPUs, one CPU of which stays with Ray Data (which feeds the ranks). Measured with the
  training loop on 2 cores: 1 rank x 2 threads 104 images/s, 2 ranks x 1 thread 64. On GPU
  clusters: one rank per GPU.
- A cluster that can grow (its autoscaler's node groups, from the GCS): the actor pool may
  grow to what the groups' largest sizes hold; Ray Data's autoscaler asks the cluster
  autoscaler for the bundles of the actors it wants (``ray.autoscaler.sdk.request_resources``,
  through its autoscaling coordinator), so the cluster grows for the pool.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.segment.config import SegmentScaling
    from pipeline.train.config import TrainScaling

__all__ = [
    "AUTO",
    "DEFAULT_BATCH_PIXELS",
    "MAX_ACTOR_CPUS",
    "MIN_BATCH_PIXELS",
    "READ_CPUS",
    "READ_SHARE",
    "WRITE_CPUS",
    "Auto",
    "ModelFootprint",
    "Node",
    "NodeGroup",
    "PlanError",
    "Resources",
    "SegmentPlan",
    "TrainPlan",
    "detect_resources",
    "model_footprint",
    "plan_segment",
    "plan_train",
]

Auto = Literal["auto"]
"""A scaling field's value that the plan fills from the resources."""
AUTO: Final = "auto"

READ_CPUS: Final = 0.25
"""CPUs a segmentation read (decode) task asks for, where ``decode_cpus`` is auto."""
READ_SHARE: Final = 1 / 8
"""Share of each node's CPUs kept for segmentation's read tasks (at least one task's)."""
WRITE_CPUS: Final = 0.25
"""CPUs a segmentation write task (zstd and uploads of the tables' data files) asks for,
at most; it shares the read share with the read tasks."""
MAX_ACTOR_CPUS: Final = 8
"""Largest CPU actor the plan makes: bigger nodes get several."""
DEFAULT_BATCH_PIXELS: Final = 4 * 2**20
"""The pixel budget of one model call (4 MP: sixteen 512 x 512 images, one 2300 x 1800
photo), where ``batch_pixels`` is auto and memory allows."""
MIN_BATCH_PIXELS: Final = 2**18
"""The smallest budget the plan shrinks to on a node short of memory (0.25 MP)."""

ACTOR_BASE_BYTES: Final = 2**30
"""An actor's own memory before the model: Python, torch, Ray's worker (about 0.9 GB
resident measured)."""
WEIGHT_COPIES: Final = 6
"""Copies of the fp32 weights an engine may hold (the module, reordered and reduced-precision
copies, a runtime's graph): measured 2.9x (OpenVINO) to 5.5x (ONNX Runtime) on FCN-8s VGG16."""
ACTIVATION_FACTOR: Final = 1.75
"""Measured peak resident memory over :func:`fcn.footprint.activation_peak`'s tensors: 1.7
(FCN-8s ResNet-18, torch bf16 at 4 MP), 1.15 (FCN-8s VGG16, torch bf16)."""


class PlanError(ConfigError):
    """The cluster cannot run the job as asked (e.g. no node holds one actor)."""


@dataclass(frozen=True, kw_only=True)
class Node:
    """What one Ray node offers to tasks and actors."""

    cpus: float
    gpus: float = 0.0
    memory: float = float("inf")
    """Bytes of Ray's ``memory`` resource."""


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """Nodes an autoscaling cluster can add: their shape and how many at most."""

    node: Node
    max_count: int | None
    """None: unbounded."""


@dataclass(frozen=True, kw_only=True)
class Resources:
    """A cluster: its live nodes, and the node groups its autoscaler can add."""

    nodes: tuple[Node, ...]
    groups: tuple[NodeGroup, ...] = ()

    @property
    def cpus(self) -> float:
        """CPUs of the live nodes."""
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        """GPUs of the live nodes."""
        return sum(n.gpus for n in self.nodes)


@dataclass(frozen=True, kw_only=True)
class ModelFootprint:
    """A model's inference memory: fixed bytes, plus bytes growing with the batch's pixels."""

    fixed_bytes: int
    """The runtime and the weights."""
    pixel_bytes: float
    """Bytes per input pixel of one forward pass (activations, scaled by the measured
    factor)."""
    offset_bytes: float = 0.0
    """Activations independent of the size (e.g. VGG's 100-pixel padding)."""

    def actor_bytes(self, batch_pixels: int) -> int:
        """Memory of an actor running batches of ``batch_pixels``."""
        return int(self.fixed_bytes + self.offset_bytes + self.pixel_bytes * batch_pixels)

    def pixels_within(self, memory: float) -> int:
        """The largest batch in pixels an actor with ``memory`` bytes can run (may be <= 0)."""
        if math.isinf(memory):
            return 2**62
        return int((memory - self.fixed_bytes - self.offset_bytes) / self.pixel_bytes)


@dataclass(frozen=True, kw_only=True)
class SegmentPlan:
    """How a segmentation runs: the actor pool, the reads, the batches."""

    actors: int
    """Actors started at once (every node's share; at most one per input batch)."""
    max_actors: int | None
    """How far the pool may grow on an autoscaling cluster (None: as far as it grows)."""
    cpus_per_actor: float
    gpus_per_actor: float
    """0 on CPUs."""
    threads: int
    """torch (or engine) threads per actor."""
    read_cpus: float
    """CPUs per read (decode) task."""
    write_cpus: float
    """CPUs per write task (the tables' data files): within the read share."""
    batch_pixels: int
    """Most pixels one model call stacks."""
    batch_size: int
    """Most images per actor call."""
    memory_per_actor: int
    """Bytes each actor declares to Ray."""
    nodes: int
    """Nodes with an actor's share."""

    @property
    def use_gpu(self) -> bool:
        """Whether the actors run on GPUs."""
        return self.gpus_per_actor > 0

    def describe(self) -> str:
        """One line, e.g. ``segment: 3 actors x 2 CPUs x 2 threads, ...``."""
        device = f" x {self.gpus_per_actor:g} GPU" if self.use_gpu else ""
        grows = ""
        if self.max_actors is None:
            grows = " (the pool grows with the cluster)"
        elif self.max_actors > self.actors:
            grows = f" (up to {self.max_actors})"
        tasks = (
            f"reads and writes {self.read_cpus:g} CPU"
            if self.write_cpus == self.read_cpus
            else f"reads {self.read_cpus:g} CPU, writes {self.write_cpus:g} CPU"
        )
        return (
            f"segment: {self.actors} actor(s){grows} x {self.cpus_per_actor:g} CPUs{device} x "
            f"{self.threads} threads, {tasks}, batches <= "
            f"{_mp(self.batch_pixels)} MP and {self.batch_size} images, "
            f"{_gb(self.memory_per_actor)} GB per actor, {self.nodes} node(s)"
        )


@dataclass(frozen=True, kw_only=True)
class TrainPlan:
    """How a training run is spread: ranks, their CPUs and threads, where they go."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    threads: int
    placement_strategy: str
    nodes: int
    """Nodes of the cluster with CPUs (or GPUs) for ranks."""
    warnings: tuple[str, ...] = ()
    """What the explicit options leave short (e.g. no CPU for Ray Data)."""

    def describe(self) -> str:
        """One line, e.g. ``train: 2 ranks x 1 CPU x 2 threads (SPREAD), 2 nodes``."""
        device = " x 1 GPU" if self.use_gpu else ""
        return (
            f"train: {self.num_workers} rank(s){device} x {self.cpus_per_worker:g} CPUs x "
            f"{self.threads} threads ({self.placement_strategy}), {self.nodes} node(s)"
        )


def _mp(pixels: int) -> str:
    return f"{pixels / 2**20:.2g}"


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f}"


def _read_reserve(node: Node, read_cpus: float) -> float:
    """CPUs of ``node`` kept for read tasks."""
    return max(read_cpus, node.cpus * READ_SHARE)


def _mode(values: Sequence[float]) -> float:
    """The most common value (the larger on a tie)."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def plan_segment(
    resources: Resources,
    scaling: SegmentScaling,
    *,
    footprint: ModelFootprint,
    decode_cpus: float | Auto = AUTO,
    num_images: int | None = None,
) -> SegmentPlan:
    """The segmentation's actor pool, reads and batches on ``resources``.

    Args:
        resources: The cluster.
        scaling: The job's scaling section (``auto`` fields are filled, others kept).
        footprint: The model's memory (:func:`model_footprint`).
        decode_cpus: CPUs per read task (``auto``: :data:`READ_CPUS`).
        num_images: Images to segment: no more actors start than there are batches.

    Raises:
        PlanError: No node can hold one actor (the line names what is missing).
    """
    read = READ_CPUS if decode_cpus == AUTO else float(decode_cpus)
    use_gpu = resources.gpus > 0 if scaling.use_gpu is None else scaling.use_gpu
    gpus = scaling.gpus_per_actor if use_gpu else 0.0
    if use_gpu:
        cpus = 1.0 if scaling.cpus_per_actor == AUTO else float(scaling.cpus_per_actor)
        hosts = [n for n in resources.nodes if n.gpus >= gpus]
    else:
        hosts = [n for n in resources.nodes if n.cpus - _read_reserve(n, read) >= READ_CPUS]
        if scaling.cpus_per_actor != AUTO:
            cpus = float(scaling.cpus_per_actor)
        elif hosts:
            usable = _mode([n.cpus - _read_reserve(n, read) for n in hosts])
            share = math.ceil(usable / MAX_ACTOR_CPUS)
            if scaling.actors != AUTO:  # as many as asked, spread: share each node's CPUs
                share = max(share, math.ceil(int(scaling.actors) / len(hosts)))
            cpus = max(READ_CPUS, math.floor(usable / share * 100) / 100)
        else:
            cpus = 1.0
    threads = (
        max(1, math.ceil(cpus)) if scaling.threads_per_actor == AUTO else scaling.threads_per_actor
    )
    if scaling.batch_pixels != AUTO:
        budget = int(scaling.batch_pixels)
    else:
        # The default budget, shrunk (to a power of two) where a host's memory per actor
        # cannot hold it.
        budget = DEFAULT_BATCH_PIXELS
        fits = [_memory_per_slot(n, cpus, gpus, read) for n in hosts]
        roomiest = max(fits, default=float("inf"))
        while budget > MIN_BATCH_PIXELS and footprint.actor_bytes(budget) > roomiest:
            budget //= 2
    memory = footprint.actor_bytes(budget)

    def slots(node: Node) -> int:
        return _slots(node, cpus, gpus, memory, read)

    per_node = [slots(n) for n in resources.nodes]
    capacity = sum(per_node)
    if capacity == 0:
        raise PlanError(_too_small(resources, cpus, gpus, memory, read))
    # An upper bound (the groups' nodes alive now count twice): Ray Data's autoscaler asks
    # for what the throughput calls for, and the cluster's autoscaler caps each group.
    growth = [(g.max_count, slots(g.node)) for g in resources.groups if slots(g.node)]
    max_actors: int | None = capacity
    if any(count is None for count, _ in growth):
        max_actors = None
    else:
        max_actors = capacity + sum((count or 0) * each for count, each in growth)
    if scaling.actors != AUTO:
        actors = int(scaling.actors)
        max_actors = actors
    else:
        actors = capacity
        if num_images is not None:
            actors = max(1, min(actors, math.ceil(num_images / scaling.batch_size)))
    return SegmentPlan(
        actors=actors,
        max_actors=max_actors,
        cpus_per_actor=cpus,
        gpus_per_actor=gpus,
        threads=threads,
        read_cpus=read,
        write_cpus=min(WRITE_CPUS, read),
        batch_pixels=budget,
        batch_size=scaling.batch_size,
        memory_per_actor=memory,
        nodes=sum(1 for s in per_node if s),
    )


def _memory_per_slot(node: Node, cpus: float, gpus: float, read: float) -> float:
    """The memory each actor of ``node`` may have, with as many actors as its CPUs (GPUs)
    hold."""
    by_cpu = math.floor((node.cpus - (0 if gpus else _read_reserve(node, read))) / cpus)
    count = min(by_cpu, math.floor(node.gpus / gpus)) if gpus else by_cpu
    return node.memory / max(1, count)


def _slots(node: Node, cpus: float, gpus: float, memory: int, read: float) -> int:
    """Actors ``node`` holds, with a read task's CPUs left on CPU nodes."""
    free = node.cpus - (0.0 if gpus else _read_reserve(node, read))
    count = math.floor(free / cpus + 1e-9) if free > 0 else 0
    if gpus:
        count = min(count, math.floor(node.gpus / gpus + 1e-9))
    if not math.isinf(node.memory):
        count = min(count, math.floor(node.memory / memory))
    return max(0, count)


def _too_small(resources: Resources, cpus: float, gpus: float, memory: int, read: float) -> str:
    """One line: what an actor needs, and what the largest node offers."""
    need = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else f" (+ {read:g} for reads)")
    need += f" and {_gb(memory)} GB of memory"
    if not resources.nodes:
        return f"segment: this Ray cluster has no nodes with resources; an actor needs {need}"
    big = max(resources.nodes, key=lambda n: (n.gpus, n.cpus, n.memory))
    offer = f"{big.cpus:g} CPUs, {big.gpus:g} GPUs, {_gb(big.memory)} GB"
    return (
        f"segment: no node of this Ray cluster can hold one actor: it needs {need}, the "
        f"largest node offers {offer} (lower --cpus-per-actor or --batch-pixels, or add nodes)"
    )


def plan_train(resources: Resources, scaling: TrainScaling) -> TrainPlan:
    """The training run's ranks on ``resources``.

    Args:
        resources: The cluster.
        scaling: The job's scaling section (``auto`` fields are filled, others kept).

    Raises:
        PlanError: The ranks cannot fit (e.g. GPUs asked on a cluster without).
    """
    use_gpu = resources.gpus > 0 if scaling.use_gpu is None else scaling.use_gpu
    warnings: list[str] = []
    total = resources.cpus
    if use_gpu:
        hosts = [n for n in resources.nodes if n.gpus >= 1]
        gpus = int(sum(math.floor(n.gpus) for n in hosts))
        if gpus == 0:
            raise PlanError(
                f"train: --use-gpu on a Ray cluster without GPUs ({total:g} CPUs, 0 GPUs)"
            )
        workers = gpus if scaling.num_workers == AUTO else int(scaling.num_workers)
        per_node = False
    else:
        hosts = [n for n in resources.nodes if n.cpus >= 1]
        per_node = scaling.num_workers == AUTO
        workers = max(1, len(hosts)) if per_node else int(scaling.num_workers)
    if scaling.cpus_per_worker != AUTO:
        cpus = float(scaling.cpus_per_worker)
        if workers * cpus > total - 1:
            # A warning, not an error: an autoscaling cluster grows when the ranks ask.
            warnings.append(
                f"{workers} workers x {cpus:g} CPUs leave no CPU of the cluster's {total:g} now "
                "to Ray Data, which feeds the workers; unless the cluster scales up, training "
                "waits. Lower --cpus-per-worker (torch threads are set apart, with "
                "--threads-per-worker)."
            )
    elif per_node and min((n.cpus for n in hosts), default=0) >= 2:
        # One rank per node: all of the smallest host's CPUs but one (Ray Data's).
        cpus = min(n.cpus for n in hosts) - 1.0
    else:
        spare = total - 1.0
        cpus = 1.0 if spare >= workers else math.floor(spare / workers * 100) / 100
        if cpus < 0.05:
            raise PlanError(
                f"train: {workers} worker(s) do not fit a Ray cluster of {total:g} CPUs with one "
                "CPU left for Ray Data: use fewer workers or a bigger cluster"
            )
    if scaling.threads_per_worker != AUTO:
        threads = int(scaling.threads_per_worker)
    elif per_node and hosts and not use_gpu:
        threads = max(1, int(min(n.cpus for n in hosts)))
    else:
        threads = max(1, math.ceil(cpus))
    if scaling.placement_strategy != AUTO:
        strategy = str(scaling.placement_strategy)
    else:
        strategy = "SPREAD" if per_node and workers > 1 else "PACK"
    return TrainPlan(
        num_workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus,
        threads=threads,
        placement_strategy=strategy,
        nodes=len(hosts),
        warnings=tuple(warnings),
    )


def detect_resources() -> Resources:
    """The connected Ray cluster's live nodes, and its autoscaler's node groups (if any)."""
    import ray
    import ray._private.state

    nodes = []
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        have = info.get("Resources", {})
        node = Node(
            cpus=float(have.get("CPU", 0.0)),
            gpus=float(have.get("GPU", 0.0)),
            memory=float(have.get("memory", float("inf"))),
        )
        if node.cpus or node.gpus:
            nodes.append(node)
    groups = []
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an old or partial GCS: no autoscaler information
        config = None
    for group in getattr(config, "node_group_configs", None) or ():
        if not group.resources or group.max_count == 0 or group.max_count == group.min_count:
            continue
        have = dict(group.resources)
        groups.append(
            NodeGroup(
                node=Node(
                    cpus=float(have.get("CPU", 0)),
                    gpus=float(have.get("GPU", 0)),
                    memory=float(have.get("memory", float("inf"))),
                ),
                max_count=None if group.max_count == -1 else int(group.max_count),
            )
        )
    return Resources(nodes=tuple(nodes), groups=tuple(groups))


def model_footprint(
    architecture: str, backbone: str, num_classes: int, **options: Any
) -> ModelFootprint:
    """A model's inference memory, from a pass on the ``meta`` device (milliseconds, no data).

    Args:
        architecture: ``fcn32s``, ``fcn16s`` or ``fcn8s``.
        backbone: e.g. ``resnet18``.
        num_classes: Output classes.
        **options: The card's model options.
    """
    import torch

    from fcn.footprint import activation_peak, parameter_bytes
    from fcn.models import build_model

    with torch.device("meta"):
        model = build_model(f"{architecture}_{backbone}", num_classes, **options).eval()
    small, large = activation_peak(model, 512, 512), activation_peak(model, 1024, 1024)
    per_pixel = (large - small) / (1024 * 1024 - 512 * 512)
    offset = max(0.0, small - per_pixel * 512 * 512)
    return ModelFootprint(
        fixed_bytes=ACTOR_BASE_BYTES + WEIGHT_COPIES * parameter_bytes(model),
        pixel_bytes=per_pixel * ACTIVATION_FACTOR,
        offset_bytes=offset * ACTIVATION_FACTOR,
    )
