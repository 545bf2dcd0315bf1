"""The canonical catalog model, source readers, the generator, and preparation."""
