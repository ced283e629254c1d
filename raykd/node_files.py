"""Files read on a cluster's nodes: a missing one is bad input that names the node.

The driver checks the files a config names once, where the job is submitted
(``raykd.config.load_config``). Workers and the teacher actor read the paths the driver resolved;
on a cluster without a shared filesystem such a path can be missing on their node, and the
error must say which node instead of surfacing as a bare FileNotFoundError in a traceback.
"""

from __future__ import annotations

from pathlib import Path

from raykd.errors import ConfigError


def where() -> str:
    """This process's node: ``node 10.0.0.5 (id 1a2b3c4d)`` inside Ray, else ``this machine``."""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            return f"node {ray.util.get_node_ip_address()} (id {node_id[:8]})"
    except Exception:  # noqa: BLE001 - naming the node must never hide the real error
        pass
    return "this machine"


def require(path: str | Path, field: str, kind: str = "file") -> Path:
    """``path`` when it exists here (a file, or with ``kind="folder"`` anything); else a
    one-line ConfigError naming ``field`` and this node."""
    p = Path(path).expanduser()
    if p.is_file() if kind == "file" else p.exists():
        return p
    raise ConfigError(f"{field}: {kind} {str(path)!r} does not exist on {where()}; every node "
                      f"reads it at that path: put it on storage all nodes share, or copy it "
                      f"to each node")
