"""The scale-out deploy files stay consistent with the code: deploy/compose.trial.yaml (PostgreSQL,
a Dask scheduler and workers, two receivers, a worker node, Orthanc) and the example
configurations of deploy/examples/ load with node.config, and the compose services run the roles
and the Dask cluster the configuration names.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from node.config import ROLES, config_from_dict, load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.trial.yaml").read_text())


def test_example_configurations_load():
    site = load_config(DEPLOY / "examples" / "site.toml")
    assert site.database_url.startswith("sqlite") and site.jobs.executor == "process" and site.node.role == "all"
    assert [p.name for p in site.protocols] == ["thigh"] and site.destinations[0].query
    central = load_config(DEPLOY / "examples" / "central.toml")
    assert central.database_url.startswith("postgresql+psycopg://")
    assert central.jobs.executor == "dask" and central.jobs.scheduler_address == "tcp://dask-scheduler:8786"
    assert central.node.allowed_calling_aes and central.jobs.lease_seconds == 600.0


def test_trial_compose_runs_the_cluster_its_configuration_names():
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "dask-scheduler", "dask-worker", "receiver-1", "receiver-2", "worker",
            "orthanc"} <= set(services)
    config = config_from_dict(tomllib.loads(compose["configs"]["musclenode-central"]["content"]), source="compose")
    assert config.database_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in config.database_url
    assert config.jobs.executor == "dask" and config.jobs.scheduler_address == "tcp://dask-scheduler:8786"
    assert [d.host for d in config.destinations] == ["orthanc"]
    roles = {name: s["command"][s["command"].index("--role") + 1] for name, s in services.items()
             if "--role" in s.get("command", [])}
    assert roles == {"receiver-1": "receiver", "receiver-2": "receiver", "worker": "worker"}
    assert set(roles.values()) <= set(ROLES)
    # receivers publish the node's port on two host ports; every node and Dask worker shares one storage root
    assert [s["ports"][0] for s in (services["receiver-1"], services["receiver-2"])] == ["11112:11112", "11113:11112"]
    for name in ("receiver-1", "receiver-2", "worker", "dask-worker"):
        assert f"musclenode-data:{config.node.data_dir}" in services[name]["volumes"], name
    scheduler = services["dask-scheduler"]["entrypoint"]
    assert scheduler[:2] == ["dask", "scheduler"] and scheduler[scheduler.index("--port") + 1] == "8786"
    worker = services["dask-worker"]["entrypoint"]
    assert worker[:3] == ["dask", "worker", config.jobs.scheduler_address]
    assert services["dask-worker"]["deploy"]["replicas"] == 2


def test_trial_compose_reaches_orthanc_and_postgres_by_service_name():
    compose = _compose()
    env = compose["services"]["postgres"]["environment"]
    config = config_from_dict(tomllib.loads(compose["configs"]["musclenode-central"]["content"]), source="compose")
    assert config.database_url == (f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
                                   f"@postgres:5432/{env['POSTGRES_DB']}")
    orthanc = compose["services"]["orthanc"]["environment"]
    assert config.destinations[0].ae_title == orthanc["ORTHANC__DICOM_AET"]
    assert config.destinations[0].port == int(orthanc["ORTHANC__DICOM_PORT"])
