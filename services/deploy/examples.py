"""The plain manifests under k8s/: the chart rendered for each example environment
(k8s/<environment>/values.yaml -> k8s/<environment>/bedside.yaml), so that they cannot drift
from the chart. Regenerate with ``python -m services.deploy.examples``."""

from __future__ import annotations

import sys
from pathlib import Path

from services.deploy.helm import render
from services.deploy.release import load_values_file

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "bedside"
EXAMPLES = ROOT / "k8s"
HEADER = ("# Generated from charts/bedside with {values} by `python -m services.deploy.examples`;"
          "\n# edit the values file and regenerate instead of editing this file.\n")


def render_example(values_file: Path, release: str = "bedside",
                   namespace: str = "bedside") -> str:
    rendered = render(CHART, load_values_file(values_file), release, namespace)
    docs = [f"# Source: {path}\n{text.strip()}\n" for path, text in sorted(rendered.items())
            if path.endswith(".yaml")]
    rel = values_file.relative_to(ROOT)
    return HEADER.format(values=rel) + "---\n" + "---\n".join(docs)


def environments() -> list[Path]:
    return sorted(p.parent for p in EXAMPLES.glob("*/values.yaml"))


def main() -> int:
    for env in environments():
        (env / "bedside.yaml").write_text(render_example(env / "values.yaml"), encoding="utf-8")
        print(f"wrote {env.relative_to(ROOT)}/bedside.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
