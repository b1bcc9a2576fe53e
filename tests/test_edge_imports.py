"""The board's code never imports torch, transformers or redis, and works without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:  # the same module object as the other test files use (one export cache)
    from tests.tiny_models import exported_tiny
except ImportError:  # tests/ itself on sys.path
    from tiny_models import exported_tiny

#: Runs with the edge extra alone (no torch, no redis): the board's Python 3.10 CI step too.
pytestmark = pytest.mark.edge

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "transformers", "redis")


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_edge_modules_import_no_heavy_deps():
    proc = _python(
        """
        import importlib, json, pkgutil, sys
        import edge_agent
        names = ["edge_agent"]
        for info in pkgutil.walk_packages(edge_agent.__path__, "edge_agent."):
            importlib.import_module(info.name)
            names.append(info.name)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "redis"))
        print(json.dumps({"modules": names, "heavy": heavy}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for required in (
        "edge_agent.backbone",
        "edge_agent.task",
        "edge_agent.features",
        "edge_agent.keys",
    ):
        assert required in result["modules"]
    assert result["heavy"] == [], f"edge_agent pulled in {result['heavy']}"


def test_edge_runtime_works_without_torch(tmp_path_factory):
    backbone_dir, manifest = exported_tiny(tmp_path_factory, "llama")
    proc = _python(
        """
        import importlib.abc, json, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "redis"):
                    raise ImportError(f"{name} is blocked on the board")
                return None

        sys.meta_path.insert(0, Block())
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the import blocker does not work")

        from edge_agent.backbone import Backbone
        from edge_agent.features import FeatureExtractor, default_taps
        from edge_agent.keys import sample_key
        from edge_agent.task import TaskSpec

        bb = Backbone.load(sys.argv[1], threads=1)
        task = TaskSpec("sentiment", "Review: {text}\\nSentiment:", ["negative", "positive"],
                        [" negative", " positive"])
        f = FeatureExtractor(bb, task, max_length=32).extract(["a good movie", "a bad film , too long"])
        keys = [sample_key(b"secret", bb.fingerprint, bb.pivot, t) for t in f.token_ids]
        print(json.dumps({
            "states": list(f.states.shape), "prior": f.prior.tolist(), "keys": keys,
            "taps": default_taps(bb.num_layers),
            "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "redis")),
        }))
        """,
        str(backbone_dir),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["states"] == [2, manifest.num_layers + 1, manifest.hidden_size]
    assert len(out["prior"]) == 2 and all(abs(sum(p) - 1) < 1e-5 for p in out["prior"])
    assert len(set(out["keys"])) == 2
    assert out["taps"] == [3, 4]
    assert out["heavy"] == []


@pytest.mark.parametrize(
    "module", ["edge_agent.backbone", "edge_agent.task", "edge_agent.features", "edge_agent.keys"]
)
def test_no_heavy_import_statements(module):
    """A cheap static check too: the source names none of the forbidden packages."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin
    tree = ast.parse(Path(spec.origin).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots = [node.module.split(".")[0]]
        else:
            continue
        assert not set(roots) & set(FORBIDDEN), f"{module} imports {roots}"
