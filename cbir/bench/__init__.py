"""The retrieval benchmark (`cbir bench`)."""
