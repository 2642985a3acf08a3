"""ray_cluster.yaml: valid for `ray up` (Ray's own prepare_config + validate_config, offline),
and nobody else gets in: Redis with a password on the private IP only, persistent; the
dashboard on loopback; token auth on every node; no secret in the file."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"
OPEN = ("0.0.0.0", "*", "::", "[::]")


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def commands(config: dict, key: str) -> str:
    return "\n".join(config.get(key, []))


def test_ray_accepts_the_file(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_workers_autoscale(prepared):
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}
    assert workers, "no worker node type"
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, f"{name} has no GPU"
        assert node["min_workers"] < node["max_workers"], f"{name} does not autoscale"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0


def test_every_node_installs_this_project(prepared):
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands are merged in
        text = commands(prepared, key)
        assert re.search(r"pip install .*~/distill", text), key
    assert prepared["file_mounts"]["~/distill"] == "."
    assert "redis-server" in commands(prepared, "head_setup_commands")


def redis_conf_lines(prepared) -> list[str]:
    text = commands(prepared, "head_setup_commands")
    return re.findall(r'echo "([^"]*)"', text)


def test_redis_binds_the_private_address_only(prepared):
    binds = [line.split()[1:] for line in redis_conf_lines(prepared) if line.startswith("bind ")]
    assert binds, "Redis config sets no bind address"
    for addrs in binds:
        assert addrs and not set(addrs) & set(OPEN), f"Redis binds {addrs}"
    assert "protected-mode yes" in redis_conf_lines(prepared)


def test_redis_requires_a_password_that_is_not_in_the_file(prepared):
    lines = [line for line in redis_conf_lines(prepared) if line.startswith("requirepass ")]
    assert lines, "Redis has no requirepass"
    for line in lines:
        # read from a file made on the head, never a literal committed here
        assert re.fullmatch(r"requirepass \$\(cat [^)]+\)", line), line
    assert "openssl rand" in commands(prepared, "head_setup_commands")


def test_redis_persists(prepared):
    assert "appendonly yes" in redis_conf_lines(prepared)


def test_dashboard_is_not_opened_to_the_world(raw, prepared):
    head_start = commands(prepared, "head_start_ray_commands")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert hosts and all(h in ("127.0.0.1", "localhost") for h in hosts), hosts
    everything = yaml.safe_dump(prepared)
    assert "0.0.0.0" not in everything.replace("0.0.0.0/0", "")  # no bind-all address anywhere
    for perm in raw.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        ports = range(perm.get("FromPort", 0), perm.get("ToPort", 65535) + 1)
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in perm.get("IpRanges", []))
        assert not (public and (8265 in ports or 6379 in ports or 6380 in ports)), perm


def test_token_auth_on_every_node(prepared):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_ray_and_redis_ports_do_not_collide(prepared):
    head_start = commands(prepared, "head_start_ray_commands")
    gcs = re.search(r"ray start --head --port=(\d+)", head_start).group(1)
    assert "port 6379" in redis_conf_lines(prepared) and gcs != "6379"
    assert f"$RAY_HEAD_IP:{gcs}" in commands(prepared, "worker_start_ray_commands")
