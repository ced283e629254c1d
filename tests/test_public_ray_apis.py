"""raykd runs on Ray's public APIs: no module of the package reaches into Ray's private modules
or its generated GCS protobufs (they change between Ray releases without notice)."""

from __future__ import annotations

from pathlib import Path

import raykd

PRIVATE = ("ray._private", "gcs_pb2", "ray.core.generated")


def test_package_source_names_no_private_ray_module():
    root = Path(raykd.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 20  # the package itself, not an empty folder
    hits = [f"{path.relative_to(root.parent)}:{n}: {line.strip()}"
            for path in sources
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if any(name in line for name in PRIVATE)]
    assert hits == []
