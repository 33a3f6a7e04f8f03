"""FAISS alone: numpy in and out (factories, training, on-disk lists, tuning, search)."""
