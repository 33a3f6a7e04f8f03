"""mocoserve: image embeddings from pretraining to serving."""

__version__ = "0.1.0"
