"""Distributed training: configuration (``config``), the driver (``driver``) and one rank
(``worker``)."""
