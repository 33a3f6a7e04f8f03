"""FAISS alone: numpy in and out.

Modules, each on those before it: factory (index kinds), params (search settings), sync (ids,
adding, patching), train, io (files), ondisk (lists in a file), search (Searcher, GPU layout),
tune (exact neighbours, recall, tuning), build (on top); planner (which index) and knn apart.
"""
