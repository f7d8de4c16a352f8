"""The result tables as Apache Iceberg tables: catalog, data files, commits, readers, upkeep.

- :mod:`pipeline.store.catalog`: which catalog an output root uses and the tables in it.
- :mod:`pipeline.store.files`: :class:`~pipeline.store.files.TableWriter`, which Ray workers
  (and the driver) use to write a run's data files; it needs no catalog.
- :mod:`pipeline.store.runs`: :class:`~pipeline.store.runs.RunWriter`, the driver's side of a
  run: refuse, overwrite or resume; settle the run's files; commit them atomically.
- :mod:`pipeline.store.read`: readers of committed runs (Arrow, DuckDB).
- :mod:`pipeline.store.maintain`: expire snapshots, delete orphan files.
- :mod:`pipeline.store.migrate`: convert an output root of the marker format.

Nothing here is imported by this package's ``__init__``: a Ray worker importing
:mod:`pipeline.store.files` loads neither pyiceberg nor SQLAlchemy.
"""
