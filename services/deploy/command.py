"""``bedside deploy`` argument handling: values assembly, dry run, or a real release."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.deploy.errors import DeployError
from services.deploy.release import ModelRelease, deep_merge, load_values_file, release_values

BUNDLED_CHART = Path(__file__).resolve().parents[2] / "charts" / "bedside"


def user_values(files: list[Path], set_values: list[str]) -> dict[str, Any]:
    from services.deploy.helm import helm_sdk

    values: dict[str, Any] = {}
    for path in files:
        values = deep_merge(values, load_values_file(path))
    helm = helm_sdk()
    for expression in set_values:
        try:
            values = deep_merge(values, helm.parse_set_string(expression))
        except helm.HelmError as exc:
            raise DeployError(f"--set {expression!r}: {exc}") from exc
    return values


def run_deploy(args: argparse.Namespace) -> int:
    chart = args.chart or BUNDLED_CHART
    if not (chart / "Chart.yaml").is_file():
        raise DeployError(f"no Helm chart at {chart} (pass --chart)")
    model = ModelRelease.from_repository(args.repository, args.model)
    values = release_values(model, user_values(args.values, args.set_values))
    if args.dry_run:
        from services.deploy.helm import render

        rendered = render(chart, values, args.release, args.namespace)
        if args.out is None:
            for path, text in sorted(rendered.items()):
                print(f"---\n# Source: {path}\n{text.strip()}")
        else:
            for path, text in rendered.items():
                target = args.out / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            print(f"rendered {len(rendered)} templates of {model.name} version "
                  f"{model.version} into {args.out}")
        return 0

    from services.deploy.cluster import KubeCluster
    from services.deploy.deployer import deploy
    from services.deploy.helm import HelmReleaser

    releaser = HelmReleaser(chart, args.namespace, int(args.timeout), args.kubeconfig,
                            args.context)
    try:
        outcome = deploy(releaser, KubeCluster(args.kubeconfig, args.context), args.release,
                         args.namespace, model, values, args.timeout)
    finally:
        releaser.close()
    print(f"{outcome.action} of release {outcome.release} done: {outcome.model} version "
          f"{outcome.version} is ready")
    return 0
