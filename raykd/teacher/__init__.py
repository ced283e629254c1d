"""The teacher: cache format (cache.py, topk.py) and the Ray actor that serves it (actor.py)."""
