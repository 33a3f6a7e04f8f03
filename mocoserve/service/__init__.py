"""`mocoserve serve`: the HTTP service for embeddings and similar-image search (FastAPI)."""
