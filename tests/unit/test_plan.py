"""Sizing from the resources (``pipeline.plan``): clusters in, plans out, options win."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import make
from pipeline.plan import (
    DEFAULT_BATCH_PIXELS,
    MIN_BATCH_PIXELS,
    ModelFootprint,
    Node,
    NodeGroup,
    PlanError,
    Resources,
    model_footprint,
    plan_segment,
    plan_train,
)
from pipeline.segment.config import SegmentScaling
from pipeline.train.config import TrainConfig, TrainScaling

pytestmark = pytest.mark.unit

GB = 10**9
# FCN-8s ResNet-18's footprint, rounded: 1.3 GB fixed, 224 bytes a pixel.
SMALL = ModelFootprint(fixed_bytes=int(1.3 * GB), pixel_bytes=224.0)
LAPTOP = Resources(nodes=(Node(cpus=2, memory=16 * GB),))
HEAD = Node(cpus=0, memory=8 * GB)  # KubeRay's head: no work goes there


def segment(resources: Resources, **scaling: Any) -> Any:
    return plan_segment(resources, SegmentScaling(**scaling), footprint=SMALL)


def test_a_two_core_machine_gives_one_actor_all_cores_but_a_read_share() -> None:
    plan = segment(LAPTOP)
    assert (plan.actors, plan.max_actors, plan.nodes) == (1, 1, 1)
    # 1.75 CPUs reserved, 2 threads: the read task's quarter is time-shared with the model,
    # and with the tasks writing the tables' files, which fit there too.
    assert (plan.cpus_per_actor, plan.threads, plan.read_cpus) == (1.75, 2, 0.25)
    assert plan.write_cpus == 0.25 and plan.cpus_per_actor + plan.write_cpus <= 2
    assert plan.batch_pixels == DEFAULT_BATCH_PIXELS and not plan.use_gpu
    assert plan.memory_per_actor == SMALL.actor_bytes(DEFAULT_BATCH_PIXELS)
    assert plan.describe() == (
        "segment: 1 actor(s) x 1.75 CPUs x 2 threads, reads and writes 0.25 CPU, batches <= 4 MP "
        "and 16 images, 2.2 GB per actor, 1 node(s)"
    )


def test_big_cpu_nodes_get_several_actors_of_at_most_eight_cpus() -> None:
    cluster = Resources(nodes=(HEAD, *[Node(cpus=16, memory=64 * GB)] * 4))
    plan = segment(cluster)
    # Each node keeps 2 CPUs (an eighth) for reads; 14 left make two actors of 7.
    assert (plan.actors, plan.cpus_per_actor, plan.threads, plan.nodes) == (8, 7, 7, 4)
    huge = segment(Resources(nodes=(Node(cpus=64, memory=256 * GB),)))
    assert (huge.actors, huge.cpus_per_actor, huge.threads) == (7, 8, 8)


def test_gpu_nodes_get_one_actor_per_gpu_by_default() -> None:
    cluster = Resources(
        nodes=(HEAD, Node(cpus=32, memory=64 * GB), *[Node(cpus=16, gpus=4, memory=64 * GB)] * 2)
    )
    plan = segment(cluster)
    assert plan.use_gpu and (plan.actors, plan.gpus_per_actor, plan.cpus_per_actor) == (8, 1, 1)
    assert plan.nodes == 2
    shared = segment(cluster, gpus_per_actor=0.5)
    assert shared.actors == 16
    on_cpus = segment(cluster, use_gpu=False)  # told otherwise
    assert not on_cpus.use_gpu and on_cpus.nodes == 3


def test_an_autoscaling_cluster_lets_the_pool_grow() -> None:
    node = Node(cpus=4, memory=16 * GB)
    bounded = Resources(nodes=(HEAD, node), groups=(NodeGroup(node=node, max_count=3),))
    plan = segment(bounded)
    assert (plan.actors, plan.max_actors) == (1, 4)
    assert "(up to 4)" in plan.describe()
    unbounded = Resources(nodes=(HEAD, node), groups=(NodeGroup(node=node, max_count=None),))
    assert segment(unbounded).max_actors is None
    # A group whose nodes cannot hold an actor adds nothing.
    gpu_only = Resources(nodes=(node,), groups=(NodeGroup(node=HEAD, max_count=None),))
    assert segment(gpu_only).max_actors == 1


def test_short_memory_shrinks_the_pixel_budget_then_the_actor_count() -> None:
    tight = Resources(nodes=(Node(cpus=2, memory=2 * GB),))
    plan = segment(tight)
    assert MIN_BATCH_PIXELS <= plan.batch_pixels < DEFAULT_BATCH_PIXELS
    assert plan.memory_per_actor <= 2 * GB and plan.actors == 1
    # 16 CPUs but memory for two actors at the smallest budget: two actors.
    crowded = Resources(nodes=(Node(cpus=16, memory=3 * GB),))
    few = segment(crowded, cpus_per_actor=1)
    assert few.batch_pixels == MIN_BATCH_PIXELS and few.actors == 2


def test_few_images_start_few_actors() -> None:
    cluster = Resources(nodes=(*[Node(cpus=16, memory=64 * GB)] * 4,))
    assert segment(cluster).actors == 8
    assert plan_segment(
        cluster, SegmentScaling(batch_size=4), footprint=SMALL, num_images=10
    ).actors == 3  # fmt: skip


def test_every_option_given_wins_over_the_plan() -> None:
    cluster = Resources(nodes=(*[Node(cpus=16, memory=64 * GB)] * 2,))
    assert segment(cluster, actors=3).actors == 3
    assert segment(cluster, actors=3).max_actors == 3
    assert segment(cluster, cpus_per_actor=2).actors == 14  # 7 per node
    assert segment(cluster, threads_per_actor=1).threads == 1
    assert segment(cluster, batch_pixels=2**20).batch_pixels == 2**20
    assert segment(cluster, batch_size=4).batch_size == 4
    # Actors given, CPUs auto: the node's CPUs shared, so that every actor asked for starts.
    two = segment(LAPTOP, actors=2)
    assert (two.actors, two.cpus_per_actor, two.threads) == (2, 0.87, 1)
    assert segment(cluster, actors=3).cpus_per_actor == 7  # two a node fit as they are
    reads = plan_segment(LAPTOP, SegmentScaling(), footprint=SMALL, decode_cpus=1.0)
    assert (reads.read_cpus, reads.cpus_per_actor, reads.write_cpus) == (1.0, 1.0, 0.25)
    # Writes never ask for more than the reads' share keeps: a one-CPU node, thin reads.
    thin = plan_segment(
        Resources(nodes=(Node(cpus=1, memory=16 * GB),)), SegmentScaling(), footprint=SMALL,
        decode_cpus=0.1,
    )  # fmt: skip
    assert thin.write_cpus == 0.1 and thin.cpus_per_actor + thin.write_cpus <= 1


def test_a_cluster_too_small_for_one_actor_says_what_is_missing() -> None:
    with pytest.raises(PlanError) as error:
        segment(Resources(nodes=(HEAD,)))
    message = str(error.value)
    assert "\n" not in message
    assert "needs 1 CPU" in message and "largest node offers 0 CPUs" in message
    with pytest.raises(PlanError, match="needs 1 CPU and 1 GPU"):
        segment(LAPTOP, use_gpu=True)
    with pytest.raises(PlanError, match="GB of memory"):
        segment(Resources(nodes=(Node(cpus=8, memory=GB),)))
    with pytest.raises(PlanError, match="no nodes"):
        segment(Resources(nodes=()))


def train(resources: Resources, **scaling: Any) -> Any:
    return plan_train(resources, TrainScaling(**scaling))


def test_training_runs_one_rank_per_cpu_node_with_all_its_threads() -> None:
    # Measured on 2 cores: 1 rank x 2 threads 104 images/s, 2 ranks x 1 thread 64.
    plan = train(LAPTOP)
    assert (plan.num_workers, plan.cpus_per_worker, plan.threads) == (1, 1, 2)
    assert plan.placement_strategy == "PACK" and not plan.use_gpu
    nodes = train(Resources(nodes=(HEAD, *[Node(cpus=8)] * 3)))
    assert (nodes.num_workers, nodes.cpus_per_worker, nodes.threads) == (3, 7, 8)
    assert nodes.placement_strategy == "SPREAD"
    assert nodes.describe() == "train: 3 rank(s) x 7 CPUs x 8 threads (SPREAD), 3 node(s)"


def test_training_runs_one_rank_per_gpu_by_default() -> None:
    plan = train(Resources(nodes=(HEAD, *[Node(cpus=16, gpus=4)] * 2)))
    assert plan.use_gpu and (plan.num_workers, plan.cpus_per_worker) == (8, 1)
    with pytest.raises(PlanError, match="without GPUs"):
        train(LAPTOP, use_gpu=True)


def test_training_options_win_and_keep_a_cpu_for_ray_data() -> None:
    plan = train(LAPTOP, num_workers=2)
    # Two ranks on two CPUs: half a CPU each, one left for Ray Data.
    assert (plan.num_workers, plan.cpus_per_worker, plan.threads) == (2, 0.5, 1)
    assert train(LAPTOP, num_workers=2, threads_per_worker=2).threads == 2
    assert train(LAPTOP, placement_strategy="SPREAD").placement_strategy == "SPREAD"
    crowded = train(LAPTOP, num_workers=2, cpus_per_worker=1)
    assert crowded.cpus_per_worker == 1 and "no CPU" in crowded.warnings[0]
    with pytest.raises(PlanError, match="do not fit"):
        train(Resources(nodes=(Node(cpus=1),)), num_workers=4)


def test_model_footprint_grows_with_pixels_and_the_model() -> None:
    light = model_footprint("fcn8s", "resnet18", 21)
    heavy = model_footprint("fcn8s", "vgg16", 21, dropout=0.5)
    # The measured peaks (README): 218 bytes a pixel for ResNet-18, 842 for VGG16 (torch bf16).
    assert 200 < light.pixel_bytes < 260 and 842 < heavy.pixel_bytes < 1300
    assert heavy.fixed_bytes > light.fixed_bytes > 2**30
    assert light.actor_bytes(2 * 2**20) - light.actor_bytes(2**20) == pytest.approx(
        light.pixel_bytes * 2**20, rel=1e-6
    )


def test_auto_is_an_option_value_and_numbers_are_still_checked() -> None:
    config = make(TrainConfig, dataset_uri="d", output_uri="o", num_workers="3")
    assert config.scaling.num_workers == 3
    assert make(TrainConfig, dataset_uri="d", output_uri="o").scaling.num_workers == "auto"
    with pytest.raises(ValueError, match="num_workers"):
        make(TrainConfig, dataset_uri="d", output_uri="o", num_workers="many")
    with pytest.raises(ValueError, match="actors must be >= 1"):
        SegmentScaling(actors=0)
