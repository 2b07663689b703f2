"""The repository's own promises: CI runs the README's test command; cluster.yaml is a valid Ray cluster config."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    assert readme_commands() == ["make quickstart", "make test"]
    ci = [
        ln.strip()
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ci[-1] == "make test"


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    assert len(config["provider"]["worker_ips"]) == config["max_workers"]
    # what it promises beyond the schema: an image, the rendering tools on every node (scripts/setup.sh's Debian
    # packages but the browser), token auth on every `ray start`, shared storage, the head's cpu_node resource
    assert config["docker"]["image"].startswith("rayproject/ray:")
    setup = " ".join(config["setup_commands"])
    apt = (ROOT / "scripts" / "setup.sh").read_text().split("APT_PACKAGES=(", 1)[1].split(")", 1)[0].split()
    assert [p for p in apt if not p.startswith("chromium") and p not in setup.split()] == []
    starts = config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("mount -t nfs" in c for c in config["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert "--resources='{\"cpu_node\":1}'" in config["head_start_ray_commands"][1]
