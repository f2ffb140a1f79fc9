"""tuneloop: from a few hundred examples to a fine-tuned, evaluated, registered and served model."""

__version__ = "0.1.0"
