"""cluster.yaml passes Ray's own cluster-launcher validation, offline."""

from __future__ import annotations

import yaml

from tests.helpers import REPO


def test_cluster_yaml_validates_with_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a schema violation
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    assert any("setup_env.sh" in cmd for cmd in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
