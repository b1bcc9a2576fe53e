"""The installed adapter: verified against the board's own spec and backbone, swapped in atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from schemas.adapter import AdapterUpdate
from schemas.errors import SpecMismatch
from schemas.files import atomic_write
from schemas.sidenet import SideNetForward
from schemas.spec import SideNetSpec


@dataclass
class InstalledAdapter:
    version: int
    spec: SideNetSpec
    forward: SideNetForward
    metrics: dict[str, float]


def check_update(update: AdapterUpdate, spec: SideNetSpec, fingerprint: str) -> None:
    if update.backbone_fingerprint != fingerprint:
        raise SpecMismatch(f"adapter v{update.version} is for backbone {update.backbone_fingerprint[:12]}…, "
                           f"this board runs {fingerprint[:12]}…")
    if update.spec != spec:
        raise SpecMismatch(f"adapter v{update.version} has spec {update.spec.model_dump()}, this board asked for "
                           f"{spec.model_dump()}")


def install(state_dir: Path, update: AdapterUpdate) -> None:
    """Write weights then metadata, each via a temporary file and rename: a crash leaves the old one whole."""
    d = state_dir / "adapter"
    d.mkdir(exist_ok=True)
    weights_name = f"v{update.version}.safetensors"
    meta = {"version": update.version, "job_id": update.job_id, "spec": update.spec.model_dump(mode="json"),
            "backbone_fingerprint": update.backbone_fingerprint, "metrics": update.metrics,
            "weights": weights_name}
    atomic_write(d / weights_name, update.weights)
    atomic_write(d / "current.json", json.dumps(meta, indent=1))


def load(state_dir: Path, spec: SideNetSpec, fingerprint: str) -> InstalledAdapter | None:
    meta_path = state_dir / "adapter" / "current.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    got = SideNetSpec.model_validate(meta["spec"])
    if got != spec or meta["backbone_fingerprint"] != fingerprint:
        raise SpecMismatch(f"the installed adapter (v{meta['version']}) was made for another spec or backbone")
    blob = (state_dir / "adapter" / meta["weights"]).read_bytes()
    return InstalledAdapter(int(meta["version"]), got, SideNetForward.from_bytes(got, blob), meta.get("metrics", {}))

