"""layerlab: build, train, analyze and compress the layers of transformer language models."""

__version__ = "0.1.0"
