"""Ingestion: turn a folder of images into an index (see pipeline.build_index)."""
