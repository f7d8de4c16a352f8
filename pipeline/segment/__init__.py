"""Batch segmentation: configuration (``config``), the inference actor (``actor``) and the
driver that writes the tables (``driver``)."""
