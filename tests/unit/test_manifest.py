"""A manifest is the one declaration of a service: permissions and wiring are derived from it."""

import pytest

from contracts import subjects
from contracts.audit import STREAM as AUDIT_STREAM
from contracts.envelope import Kind, RouterRequest, ToolCall
from services.registry import BY_NAME, SERVICES
from services.router.executors import EXECUTORS
from services.runtime.manifest import Consume, Durable, Manifest, Publishes, Raw, audit_api, registry_read_api
from services.runtime.service import Service
from services.runtime.settings import Settings


def test_a_service_may_subscribe_exactly_what_it_consumes_plus_its_inbox_ping_and_stats():
    router = BY_NAME["router"].permissions()
    assert set(router.subscribe) == {
        subjects.ROUTER_REQUESTS,
        "_INBOX._router.>",
        subjects.ping("router"),
        subjects.stats("router"),
        # the leaving notices of the executors it passes runs on to (services/runtime/liveness.py)
        *(subjects.leaving(executor) for executor in ("graph", "workflow", "swarm")),
    }


def test_a_service_may_publish_exactly_what_it_publishes_requests_and_probes_plus_its_audit():
    router = BY_NAME["router"].permissions()
    assert set(router.publish) == {
        subjects.GRAPH_RUNS,
        subjects.WORKFLOW_STARTS,
        subjects.SWARM_TURNS,
        subjects.ALL_EVENTS,
        subjects.ping("graph"),
        subjects.ping("workflow"),
        subjects.ping("swarm"),
        subjects.ping("router"),  # it counts its own replicas, to share each tenant's rate limit
        subjects.leaving("router"),  # as every service, when it stops
        *audit_api("router"),
        *registry_read_api(),  # it follows the tenant registry
    }
    tools = BY_NAME["tools"].permissions()
    # it only answers, audits, follows, and says when it is leaving
    assert set(tools.publish) == {*audit_api("tools"), *registry_read_api(), subjects.leaving("tools")}


def test_every_service_may_read_the_tenant_registry_and_none_may_change_it():
    for manifest in SERVICES:
        for user in manifest.users():
            assert not any(
                s.startswith(("$KV.TENANTS", "$JS.API.STREAM.CREATE.KV_TENANTS")) for s in user.permissions.publish
            )
            assert not any("PURGE.KV_TENANTS" in s or "STREAM.DELETE.KV_TENANTS" in s for s in user.permissions.publish)
        reader = manifest.users()[0 if manifest.in_app else 1]
        assert set(registry_read_api()) <= set(reader.permissions.publish), manifest.name


def test_no_service_may_publish_tenant_requests_or_read_other_services_inboxes():
    for manifest in SERVICES:
        permissions = manifest.permissions()
        assert subjects.ROUTER_REQUESTS not in permissions.publish
        assert not any(s.startswith("_INBOX.") and s != f"_INBOX._{manifest.name}.>" for s in permissions.subscribe)


def test_the_callout_responder_lives_outside_app_and_writes_audit_through_its_own_user():
    auth = BY_NAME["auth"]
    own, writer, system = auth.users()
    assert own.account == "AUTH" and own.permissions.subscribe == (subjects.AUTH_CALLOUT,)
    assert own.permissions.publish == ()
    assert writer.name == "auth-audit" and writer.account == "APP"
    # It follows the registry, and announces service replicas gone without a word (a kill -9).
    assert writer.permissions.publish == (*audit_api("auth"), *registry_read_api(), subjects.ALL_LEAVING)
    assert system.name == "auth-system" and system.account == "SYS"  # tests/security/test_connection_limits.py


def test_the_router_watches_and_may_reach_every_executor_of_its_pattern_table():
    router = BY_NAME["router"]
    assert set(router.watches) == {executor.service for executor in EXECUTORS.values()}
    assert all(executor.service in BY_NAME for executor in EXECUTORS.values())
    assert {executor.runs for executor in EXECUTORS.values()} <= set(router.permissions().publish)


def test_a_durable_consumer_gets_only_its_own_consumer_api():
    manifest = Manifest(
        "ledger",
        "test",
        (Durable("entry", "LEDGER", "t.*.ledger.entry", Kind.REQUEST, RouterRequest, "an entry"),),
        audit=False,
        follows_registry=False,
    )
    publish = manifest.permissions().publish
    assert "$JS.API.CONSUMER.MSG.NEXT.LEDGER.ledger-entry" in publish
    assert "$JS.ACK.LEDGER.ledger-entry.>" in publish
    assert not any(s.endswith(".>") and "CONSUMER" in s and "ledger-entry" not in s for s in publish)
    assert "t.*.ledger.entry" not in manifest.permissions().subscribe  # pulled through the API


def test_operation_names_are_unique_per_manifest():
    with pytest.raises(ValueError, match="twice"):
        Manifest("dup", "x", (Raw("a", "x.a", "x"), Raw("a", "x.b", "x")))


def test_a_handler_for_an_undeclared_operation_fails_at_wiring():
    service = Service(BY_NAME["tools"], Settings(log_level="error"))
    with pytest.raises(KeyError, match="no operation 'nope'"):
        service.handler("nope")


async def test_a_service_with_an_unbound_operation_refuses_to_start():
    manifest = Manifest("unbound", "x", (Consume("call", "t.*.x.call", Kind.TOOL_CALL, ToolCall, "x"),))
    service = Service(manifest, Settings(log_level="error"))
    with pytest.raises(RuntimeError, match="no handler for operations \\['call'\\]"):
        await service.start()


def test_every_registered_service_runs_from_its_own_folder():
    for manifest in SERVICES:
        assert manifest.module == f"services.{manifest.name}"
        # The monitor only asks the others for their statistics (and serves HTTP): no operation.
        assert manifest.consumes or manifest.name == "monitor", f"{manifest.name} consumes nothing"


def test_publishes_are_declared_with_summaries():
    for manifest in SERVICES:
        for publication in manifest.publishes:
            assert isinstance(publication, Publishes) and publication.summary


def test_a_service_reads_back_only_its_own_audit_chains_and_the_streams_it_declares():
    for manifest in SERVICES:
        for user in manifest.users():
            reads = [s for s in user.permissions.publish if ".MSG.GET." in s or ".DIRECT.GET." in s]
            audit = [s for s in reads if f".{AUDIT_STREAM}" in s]
            assert all(s.endswith(f".audit.{manifest.name}") for s in audit), (user.name, audit)
            # Any other read is of a stream of its own, declared in its manifest.
            assert set(reads) - set(audit) <= set(manifest.jetstream), (user.name, reads)


def test_no_tenant_subject_of_the_workflow_engines_state_is_a_tenants_to_publish_or_read():
    from contracts.permissions import tenant_permissions

    granted = tenant_permissions("acme", "dev", scopes=frozenset({"refund:approve"}))
    for pattern in (subjects.WORKFLOW_HISTORY, subjects.WORKFLOW_TASKS, subjects.WORKFLOW_TIMERS):
        area = pattern.replace("t.*.", "t.acme.").rsplit(".", 1)[0]
        assert not any(s.startswith(area) for s in granted.publish + granted.subscribe)


def test_only_a_service_with_an_audit_writer_may_announce_departures():
    with pytest.raises(ValueError, match="announces departures"):
        Manifest(name="lone", summary="x", consumes=(), announces_departures=True)
    assert [m.name for m in SERVICES if m.announces_departures] == ["auth"]
