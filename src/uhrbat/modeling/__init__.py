"""Model, checkpoint conversion and loading."""
