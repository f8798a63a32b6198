"""The compose file and the AsyncAPI document stay true to the code (no Docker engine needed)."""

from pathlib import Path

import yaml

from services.runtime.asyncapi import CHECKED_IN, render_asyncapi
from services.runtime.state import Secrets, render_nats_config
from services.runtime.system import SERVICES, service_command, service_environment

ROOT = Path(__file__).resolve().parents[2]


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_every_service_with_the_command_corral_up_uses():
    services = compose()["services"]
    for name in SERVICES:
        assert name in services, f"{name} missing from docker-compose.yml"
        assert services[name]["command"] == ["python", *service_command(name)[1:]]
        assert (ROOT / "services" / name / "__main__.py").exists()


def test_compose_gives_services_the_environment_corral_up_gives():
    services = compose()["services"]
    expected = set(service_environment("nats://x", Path("/state")))
    for name in SERVICES:
        assert expected <= set(services[name]["environment"])
        assert services[name]["environment"]["CORRAL_STATE_DIR"] == "/state"


def test_compose_services_other_than_nats_and_init_are_exactly_corrals_services():
    assert set(compose()["services"]) - {"nats", "init"} == set(SERVICES)


def test_services_scale_by_queue_group_so_compose_sets_no_fixed_names_or_ports():
    services = compose()["services"]
    for name in SERVICES:
        assert "container_name" not in services[name] and "ports" not in services[name]


def test_the_broker_image_reads_the_generated_configuration():
    nats = compose()["services"]["nats"]
    assert nats["command"] == ["-c", "/state/nats.conf"]
    assert nats["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_the_checked_in_asyncapi_document_is_current():
    assert CHECKED_IN.read_text() == render_asyncapi("yaml"), "run: corral asyncapi > contracts/asyncapi.yaml"


def test_the_asyncapi_document_lists_every_bus_operation():
    document = yaml.safe_load(render_asyncapi("yaml"))
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {
        "t.{tenant}.router.request",
        "t.{tenant}.graph.run",
        "t.{tenant}.tool.{tool}.call",
        "t.{tenant}.events.{run_id}",
        "$SYS.REQ.USER.AUTH",
    } <= addresses


def test_the_generated_server_config_routes_every_non_service_user_through_the_callout():
    import json

    config = json.loads(render_nats_config(Secrets.generate(), host="127.0.0.1", port=1, jetstream_dir="/js"))
    callout = config["authorization"]["auth_callout"]
    app_users = {user["user"] for user in config["accounts"]["APP"]["users"]}
    assert set(callout["auth_users"]) == app_users | {"auth"}
    assert callout["issuer"].startswith("A")
    assert config["accounts"]["APP"]["jetstream"] == "enabled"
