"""The index on disk: items, shards and vector files, the catalog, FAISS file, reader, writer."""
