"""Local services for development and tests (SeaweedFS S3 server)."""
