"""Cluster and service definitions (KubeRay, Ray launcher, Prefect work pool, local services)."""
