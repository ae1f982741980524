"""Training the encoders that learn from the user's own collection (`cbir train`)."""
