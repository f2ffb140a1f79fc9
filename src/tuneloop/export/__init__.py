"""Export stage: a registered version as a merged Hugging Face model or a GGUF file with an Ollama Modelfile."""

from tuneloop.export.stage import export

__all__ = ["export"]
