"""Local services for development and tests, all on 127.0.0.1.

- ``seaweedfs``: an S3 server (SeaweedFS ``weed mini``).
- ``ray_cluster``: a multi-node ``ray start`` cluster with token auth and the Jobs API.
- ``prefect_server``: a Prefect server with its own home and SQLite database.
- ``stack``: S3 and the Ray cluster in the background (``up``, ``status``, ``down``).
"""
