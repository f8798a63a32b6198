"""A service's live view of the tenants (services/runtime/tenant_registry.py), without a broker:
the files' tenants overlaid by the registry's, each registry policy checked before it is taken."""

from __future__ import annotations

import json

import structlog
from structlog.testing import CapturingLogger

from contracts.definitions import TenantPolicy
from contracts.registry import RegistryEntry, policy_digest, read_entry
from corral.demo import DEFINITIONS
from services.runtime import tenant_registry
from services.runtime.catalog import load_catalog
from services.runtime.tenant_registry import LiveTenants


def value(policy: dict | None, origin: str = "operator") -> bytes:
    entry = RegistryEntry(
        policy=TenantPolicy.model_validate(policy) if policy is not None else None,
        origin=origin,
        changed_by="test",
        at="2026-12-02T00:00:00+00:00",
    )
    return entry.model_dump_json().encode()


def acme_like(tenant: str, **changes) -> dict:
    policy = json.loads(load_catalog(DEFINITIONS).tenants["acme"].model_dump_json())
    return {**policy, "tenant": tenant, **changes}


def live() -> tuple[LiveTenants, CapturingLogger, list[frozenset[str]]]:
    log = CapturingLogger()
    tenants = LiveTenants(load_catalog(DEFINITIONS), structlog.wrap_logger(log, processors=[]))
    seen: list[frozenset[str]] = []
    tenants.on_change(lambda catalog, changed: seen.append(changed))
    return tenants, log, seen


def test_a_tenant_added_in_the_registry_is_served_and_the_listeners_hear_of_it():
    tenants, _, seen = live()
    before = tenants.catalog
    assert tenants.apply({"initech": value(acme_like("initech"))}, revision=7) == {"initech"}
    assert tenants.policy("initech").routes.keys() == before.tenants["acme"].routes.keys()
    assert seen == [frozenset({"initech"})] and tenants.revision == 7
    assert "initech" not in before.tenants  # a run holding the old catalog keeps what it had


def test_the_registry_wins_over_a_file_and_a_removal_removes_even_a_file_tenant():
    tenants, _, _ = live()
    tenants.apply({"acme": value(acme_like("acme", rate_limit={"per_second": 1, "burst": 1}))})
    assert tenants.policy("acme").rate_limit.per_second == 1
    tenants.apply({"globex": value(None)})
    assert tenants.policy("globex") is None


def test_a_deleted_registry_key_brings_back_the_files_policy():
    tenants, _, seen = live()
    files_policy = tenants.policy("acme")
    tenants.apply({"acme": value(None)})
    tenants.apply({"acme": None})
    assert tenants.policy("acme") == files_policy
    assert seen == [frozenset({"acme"}), frozenset({"acme"})]


def test_a_policy_naming_what_the_deployment_lacks_is_refused_and_the_tenant_keeps_its_own():
    tenants, log, seen = live()
    kept = tenants.policy("acme")
    broken = acme_like("acme", routes={"x": {"pattern": "graph", "graph": "no_such_graph"}}, default_route="x")
    assert tenants.apply({"acme": value(broken), "newco": value(acme_like("newco", tools=["no_such_tool"]))}) == set()
    assert tenants.policy("acme") == kept and tenants.policy("newco") is None and seen == []
    refused = [call.kwargs for call in log.calls if call.kwargs.get("event") == "tenant_registry_rejected"]
    assert {r["tenant_id"] for r in refused} == {"acme", "newco"}
    assert any("no_such_graph" in p for r in refused for p in r["problems"])


def test_unreadable_values_and_keys_that_are_no_tenant_ids_change_nothing():
    tenants, log, _ = live()
    other = acme_like("globex")
    changed = tenants.apply(
        {
            "acme": b"{not json",
            "x.y": value(acme_like("acme")),
            "initech": value(other),  # the policy names another tenant than its key
        }
    )
    assert changed == set()
    events = [call.kwargs.get("event") for call in log.calls]
    assert events.count("tenant_registry_rejected") == 3


def test_an_unchanged_policy_is_no_change():
    tenants, _, seen = live()
    tenants.apply({"acme": value(acme_like("acme"))})
    assert seen == []  # the same policy as the file's: nothing to rebuild


def test_a_listener_that_fails_does_not_keep_the_change_from_the_others():
    tenants, log, seen = live()
    tenants.on_change(lambda catalog, changed: 1 / 0)
    later: list[frozenset[str]] = []
    tenants.on_change(lambda catalog, changed: later.append(changed))
    assert tenants.apply({"initech": value(acme_like("initech"))}) == {"initech"}
    assert seen == later == [frozenset({"initech"})] and tenants.policy("initech") is not None
    assert [call.kwargs.get("event") for call in log.calls].count("tenant_listener_failed") == 1


def seeded(policy: TenantPolicy, digest: str, origin: str = "file") -> bytes:
    entry = RegistryEntry(
        policy=policy, origin=origin, changed_by="seed", at="2026-12-02T00:00:00+00:00", digest=digest
    )
    return entry.model_dump_json().encode()


def test_an_entry_seeded_from_the_same_file_policy_is_that_policy_without_reading_it_again(monkeypatch):
    tenants, _, seen = live()
    files_policy = tenants.policy("acme")
    read: list[bytes] = []
    monkeypatch.setattr(tenant_registry, "read_entry", lambda data: read.append(data) or read_entry(data))
    assert tenants.apply({"acme": seeded(files_policy, policy_digest(files_policy))}) == frozenset()
    assert tenants.policy("acme") is files_policy and read == [] and seen == []
    # Seeded from another version of the file, or changed by the operator: read and checked as ever.
    other = TenantPolicy.model_validate(acme_like("acme", rate_limit={"per_second": 2, "burst": 2}))
    for entry in (seeded(other, policy_digest(other)), seeded(other, policy_digest(files_policy), "operator")):
        tenants.apply({"acme": entry})
        assert tenants.policy("acme").rate_limit.per_second == 2
        tenants.apply({"acme": seeded(files_policy, policy_digest(files_policy))})  # back to the file's
    assert len(read) == 2
