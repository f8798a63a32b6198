"""The audit hash chain: any removed, altered or foreign entry is detected."""

from contracts.audit import AuditRecord, seal, verify_chain


def record(n: int) -> AuditRecord:
    return AuditRecord(
        at=f"2026-11-24T10:00:0{n}+00:00",
        service="tools",
        action="tool_call",
        outcome="ok",
        detail={"tool": "orders_lookup", "n": n},
    )


def chain(tenant: str = "acme", length: int = 4):
    entries, previous = [], ""
    for n in range(length):
        entry = seal(tenant, previous, [record(n)])
        entries.append((n + 1, entry.model_dump_json().encode()))
        previous = entry.hash
    return entries


def test_an_untouched_chain_verifies():
    assert verify_chain("acme", chain()) == []


def test_a_removed_entry_breaks_the_chain_after_it():
    entries = chain()
    del entries[1]
    problems = verify_chain("acme", entries)
    assert [(p.sequence, "removed" in p.problem) for p in problems] == [(3, True)]


def test_an_altered_entry_is_detected():
    entries = chain()
    sequence, raw = entries[2]
    entries[2] = (sequence, raw.replace(b'"outcome":"ok"', b'"outcome":"refused"'))
    assert any("altered" in p.problem and p.sequence == 3 for p in verify_chain("acme", entries))


def test_an_entry_rehashed_after_alteration_still_breaks_the_next_link():
    entries = chain()
    forged = seal("acme", "", [record(9)])  # a consistent entry, but not linked to its predecessor
    entries[1] = (2, forged.model_dump_json().encode())
    assert {p.sequence for p in verify_chain("acme", entries)} == {2, 3}


def test_a_missing_first_entry_is_detected_unless_it_expired():
    entries = chain()[1:]
    assert verify_chain("acme", entries) != []
    assert verify_chain("acme", entries, starts_at_first=False) == []


def test_another_tenants_entry_in_the_chain_is_detected():
    entries = chain()
    entries.append((9, seal("globex", "", [record(1)]).model_dump_json().encode()))
    assert any("tenant 'globex'" in p.problem for p in verify_chain("acme", entries))


def test_garbage_in_the_chain_is_reported_not_raised():
    assert verify_chain("acme", [(1, b"not json")])[0].problem == "unreadable entry"


def test_a_trail_is_one_chain_per_service_each_verified_on_its_own():
    from contracts.audit import verify_trail

    router, tools = chain(), chain()  # two independent chains of the same tenant
    messages = []
    for n in range(3):  # interleaved in the stream, as two services write them
        messages.append((2 * n + 1, "t.acme.audit.router", router[n][1]))
        messages.append((2 * n + 2, "t.acme.audit.tools", tools[n][1]))
    assert verify_trail("acme", messages) == []
    del messages[2]  # a router entry removed from the middle of its chain
    assert [p.sequence for p in verify_trail("acme", messages)] == [5]
