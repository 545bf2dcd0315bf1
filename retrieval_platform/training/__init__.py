"""Both training stages on Ray Train: configuration, examples, the worker loop, launching."""
