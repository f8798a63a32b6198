"""Who sees what in the monitor: the operator every tenant, a tenant only its own, and a tenant that
keeps its users apart (principal_scoped) only a token with the monitor's scope."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from contracts import subjects
from contracts.envelope import Kind, MonitorQuery, new_envelope_json
from contracts.errors import Forbidden
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from services.runtime.credentials import load_secrets
from tests.security.test_principal_scope import DEFINITIONS as PRINCIPAL_SCOPED_DEFINITIONS
from tests.support.http import Reply, http_server
from tests.support.services import running_services


@pytest.fixture
async def services(secured, monkeypatch):
    monkeypatch.setenv("CORRAL_MONITOR_HTTP", "127.0.0.1:0")
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "graph", "tools", "monitor")) as s:
        yield s


@pytest.fixture
async def monitor(secured, services):
    url = services["monitor"].monitor_url
    key = secured.secrets.dev_key
    for tenant in ("acme", "globex"):
        client = await CorralClient.connect(secured.url, tenant=tenant, token=mint_dev_token(tenant, key=key))
        await client.request("where is my order?", watch=False)
        await client.close()
    operator = {"Authorization": f"Bearer {load_secrets(secured.state_dir).monitor_operator_token}"}
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        deadline = time.monotonic() + 20
        while len((await http.get("/api/tenants", headers=operator)).json()["tenants"]) < 2:
            assert time.monotonic() < deadline, "the monitor never saw both tenants"
            await asyncio.sleep(0.2)  # polling with a deadline
        yield http, operator, {"Authorization": f"Bearer {mint_dev_token('acme', key=key)}"}


async def test_the_operator_sees_every_tenant(monitor):
    http, operator, _ = monitor
    tenants = {row["tenant"] for row in (await http.get("/api/tenants", headers=operator)).json()["tenants"]}
    assert {"acme", "globex"} <= tenants
    assert (await http.get("/metrics", headers=operator)).status_code == 200


async def test_a_tenants_token_sees_only_its_own_tenant(monitor):
    http, _, acme = monitor
    rows = (await http.get("/api/tenants", headers=acme)).json()["tenants"]
    assert [row["tenant"] for row in rows] == ["acme"]
    assert (await http.get("/api/tenants/acme", headers=acme)).status_code == 200
    assert (await http.get("/api/subjects", params={"tenant": "acme"}, headers=acme)).status_code == 200


async def test_a_tenant_cannot_see_another_tenants_figures(monitor):
    http, _, acme = monitor
    answers = []
    for tenant in ("globex", "initech"):  # one exists, one does not: the same answer
        for reply in (
            await http.get(f"/api/tenants/{tenant}", headers=acme),
            await http.get("/api/subjects", params={"tenant": tenant}, headers=acme),
        ):
            assert reply.status_code == 403 and reply.json()["error"]["code"] == "forbidden"
            answers.append(reply.json())
    assert answers[0] == answers[2] and answers[1] == answers[3]
    assert (await http.get("/metrics", headers=acme)).status_code == 403


async def test_without_a_valid_token_nothing_is_shown(monitor):
    http, _, _ = monitor
    for header in (None, "Bearer", "Bearer not-a-token", "Basic YWRtaW46eA==", "Bearer " + "x" * 5000):
        headers = {} if header is None else {"Authorization": header}
        for path in ("/api/tenants", "/api/tenants/acme", "/api/subjects?tenant=acme", "/metrics"):
            reply = await http.get(path, headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "unauthorized", (header, path)


async def test_an_expired_or_foreign_signed_token_is_refused(monitor):
    http, _, _ = monitor
    for token in (mint_dev_token("acme", key="x" * 32, ttl_s=-120), mint_dev_token("acme", key="another-key" * 4)):
        reply = await http.get("/api/tenants", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 401


# ---- over the bus: t.<tenant>.monitor.query.<principal> ------------------------------------------


@pytest.fixture
async def acme(secured, monitor):
    client = await CorralClient.connect(
        secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
    )
    yield client
    await client.close()


async def test_a_tenant_gets_its_own_figures_over_the_bus(monitor, acme):
    http, operator, _ = monitor
    answer = await acme.monitor(with_subjects=True)
    assert answer["tenant"] == "acme" and answer["totals"]["messages"] > 0
    over_http = (await http.get("/api/tenants/acme", headers=operator)).json()
    assert set(answer) - {"subjects"} == set(over_http)
    families = {row["family"] for row in answer["subjects"]}
    assert "t.acme.router.request" in families  # its connections' callout is its row too
    assert all(family.startswith("t.acme.") or family == subjects.AUTH_CALLOUT for family in families)
    assert "globex" not in json.dumps(answer)


async def test_a_tenant_cannot_ask_for_another_tenants_figures_over_the_bus(services, monitor, acme):
    # Acme's own envelope, then one claiming globex, both on globex's subject with acme's inbox.
    for tenant in ("acme", "globex"):
        body = new_envelope_json(Kind.MONITOR_QUERY, tenant, MonitorQuery(subjects=True))
        await acme.nc.publish(subjects.monitor_query("globex", acme.principal), body, reply="_INBOX.acme.x.y")
    await acme.nc.flush()
    deadline = time.monotonic() + 5
    while not any("permissions violation" in str(error).lower() for error in acme.errors):
        assert time.monotonic() < deadline, "the broker never refused the publish"
        await asyncio.sleep(0.05)  # polling with a deadline
    refused = [str(error).lower() for error in acme.errors if "permissions violation" in str(error).lower()]
    assert all('publish to "t.globex.monitor.query.' in error for error in refused)
    # The monitor never received it: nothing counted for globex on its query operation.
    answer = await acme.monitor(with_subjects=True)  # also: the connection still works
    assert answer["tenant"] == "acme" and "globex" not in json.dumps(answer)
    snapshot = services["monitor"].stats.snapshot()
    query = next(endpoint for endpoint in snapshot["endpoints"] if endpoint["name"] == "query")
    assert "globex" not in json.dumps(query)
    assert "acme" in json.dumps(query)  # counted, for its own tenant


async def test_no_field_of_the_bus_query_names_a_tenant():
    with pytest.raises(ValueError):
        MonitorQuery.model_validate({"tenant": "globex"})


# ---- tenant tokens from the identity provider's JWKS ------------------------------------------------

ISSUER, AUDIENCE = "https://idp.example", "corral"


def idp_token(key, kid: str, tenant: str = "globex", **extra) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"alice@{tenant}", "org": {"id": tenant}, "iat": now}
    return jwt.encode({**claims, "exp": now + 300, **extra}, key, algorithm="RS256", headers={"kid": kid})


async def test_the_monitor_accepts_the_tokens_of_the_identity_providers_jwks(secured, monkeypatch):
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
    published = {"idp-2026": keys[0]}

    def jwks(request):
        public = {
            kid: jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) for kid, key in published.items()
        }
        return Reply(body={"keys": [{**jwk, "kid": kid, "alg": "RS256"} for kid, jwk in public.items()]})

    with http_server(jwks) as idp:
        for name, value in {
            "CORRAL_MONITOR_HTTP": "127.0.0.1:0",
            "CORRAL_AUTH_JWKS_URL": idp.url + "/.well-known/jwks.json",
            "CORRAL_AUTH_JWKS_MIN_REFRESH_S": "0",
            "CORRAL_AUTH_ISSUER": ISSUER,
            "CORRAL_AUTH_AUDIENCE": AUDIENCE,
            "CORRAL_AUTH_TENANT_CLAIM": "org.id",
        }.items():
            monkeypatch.setenv(name, value)
        async with running_services(secured.url, secured.state_dir, ("monitor",)) as s:
            http = httpx.AsyncClient(base_url=s["monitor"].monitor_url, timeout=5)

            async def status(token: str, path: str = "/api/tenants") -> int:
                return (await http.get(path, headers={"Authorization": f"Bearer {token}"})).status_code

            try:
                assert await status(idp_token(keys[0], "idp-2026")) == 200
                assert await status(idp_token(keys[0], "idp-2026"), "/api/tenants/acme") == 403  # its own only
                assert await status(idp_token(keys[1], "idp-2026")) == 401  # a known kid, another key
                assert await status(idp_token(keys[0], "idp-2026", aud="another-app")) == 401
                assert await status(idp_token(keys[2], "idp-2027")) == 401  # not published (yet)
                published["idp-2027"] = keys[2]  # the provider rotates its keys
                assert await status(idp_token(keys[2], "idp-2027")) == 200  # fetched again for the new kid
            finally:
                await http.aclose()


# ---- a principal-scoped tenant: its figures only with the monitor's scope ----------------------

SCOPED_DEFINITIONS = PRINCIPAL_SCOPED_DEFINITIONS  # acme principal-scoped, globex not


@pytest.fixture
async def scoped(secured, tmp_path, monkeypatch):
    """acme keeps its users apart (principal_scoped), globex does not; both have traffic."""
    monkeypatch.setenv("CORRAL_MONITOR_HTTP", "127.0.0.1:0")
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(SCOPED_DEFINITIONS))
    names = ("auth", "router", "graph", "tools", "monitor")
    async with running_services(secured.url, secured.state_dir, names, definitions=tmp_path / "defs.yaml") as s:
        key = secured.secrets.dev_key
        for tenant, sub in (("acme", "alice"), ("acme", "bob"), ("globex", "carol")):
            client = await CorralClient.connect(
                secured.url, tenant=tenant, token=mint_dev_token(tenant, key=key, sub=sub)
            )
            await client.request("where is my order?", watch=False)
            await client.close()
        operator = {"Authorization": f"Bearer {load_secrets(secured.state_dir).monitor_operator_token}"}
        async with httpx.AsyncClient(base_url=s["monitor"].monitor_url, timeout=5) as http:
            deadline = time.monotonic() + 20
            while len((await http.get("/api/tenants", headers=operator)).json()["tenants"]) < 2:
                assert time.monotonic() < deadline, "the monitor never saw both tenants"
                await asyncio.sleep(0.2)  # polling with a deadline
            yield secured, http


def bearer(broker, tenant: str, sub: str, scopes=()) -> dict[str, str]:
    token = mint_dev_token(tenant, key=broker.secrets.dev_key, sub=sub, scopes=tuple(scopes))
    return {"Authorization": f"Bearer {token}"}


async def test_a_user_of_a_principal_scoped_tenant_without_the_scope_sees_none_of_its_figures_over_http(scoped):
    broker, http = scoped
    bob = bearer(broker, "acme", "bob", scopes=["refund:approve"])  # a scope, not the monitor's
    for path in ("/api/tenants", "/api/tenants/acme", "/api/subjects?tenant=acme", "/api/subjects"):
        reply = await http.get(path, headers=bob)
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "forbidden", path
        assert "alice" not in reply.text and "messages" not in reply.text
    other = await http.get("/api/tenants/globex", headers=bob)  # and, as ever, no other tenant's
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"


async def test_the_monitor_scope_shows_a_principal_scoped_tenants_figures(scoped):
    broker, http = scoped
    watcher = bearer(broker, "acme", "ops", scopes=["monitor"])
    rows = (await http.get("/api/tenants", headers=watcher)).json()["tenants"]
    assert [row["tenant"] for row in rows] == ["acme"] and rows[0]["messages"] > 0
    assert (await http.get("/api/tenants/acme", headers=watcher)).status_code == 200
    assert (await http.get("/api/tenants/globex", headers=watcher)).status_code == 403


async def test_a_tenant_that_is_not_principal_scoped_needs_no_scope(scoped):
    broker, http = scoped
    carol = bearer(broker, "globex", "carol")
    assert (await http.get("/api/tenants/globex", headers=carol)).status_code == 200
    assert [row["tenant"] for row in (await http.get("/api/tenants", headers=carol)).json()["tenants"]] == ["globex"]


async def test_a_user_of_a_principal_scoped_tenant_without_the_scope_gets_forbidden_over_the_bus(scoped):
    broker, _ = scoped
    key = broker.secrets.dev_key
    bob = await CorralClient.connect(broker.url, tenant="acme", token=mint_dev_token("acme", key=key, sub="bob"))
    ops = await CorralClient.connect(
        broker.url, tenant="acme", token=mint_dev_token("acme", key=key, sub="ops", scopes=("monitor",))
    )
    try:
        with pytest.raises(Forbidden, match="monitor"):
            await bob.monitor(with_subjects=True)
        # Claiming the scope on the subject: the broker lets a connection publish there only with
        # exactly its token's scopes, so the query never reaches the monitor.
        forged = subjects.monitor_query("acme", "bob", frozenset({"monitor"}))
        body = new_envelope_json(Kind.MONITOR_QUERY, "acme", MonitorQuery(subjects=True))
        await bob.nc.publish(forged, body, reply=f"_INBOX.acme.{subjects.principal_token('bob')}.x")
        await bob.nc.flush()
        deadline = time.monotonic() + 5
        while not any("permissions violation" in str(error).lower() for error in bob.errors):
            assert time.monotonic() < deadline, "the broker never refused the forged subject"
            await asyncio.sleep(0.05)  # polling with a deadline
        answer = await ops.monitor(with_subjects=True)  # the monitor's scope: the tenant's figures
        assert answer["tenant"] == "acme" and answer["totals"]["messages"] > 0
    finally:
        await bob.close()
        await ops.close()
