"""Datasets: layouts and manifests, bounded decoding, Ray Data reading, batches, synthetic data."""
