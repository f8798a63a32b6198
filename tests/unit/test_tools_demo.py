"""The demo data tool: each tenant sees only its own orders, whatever the query says."""

from __future__ import annotations

import json

import pytest

from contracts.errors import InvalidRequest
from corral.demo import DATA
from corral.demo.tools import lookup_orders, reload_settings
from services.toolkit.context import ToolContext


@pytest.fixture(autouse=True)
def shipped_data(monkeypatch):
    monkeypatch.delenv("CORRAL_DEMO_DATA", raising=False)
    reload_settings()
    yield
    reload_settings()


def ctx(tenant: str) -> ToolContext:
    return ToolContext(tenant_id=tenant, run_id=None, principal=None, timeout_s=5.0)


async def test_an_order_id_of_the_tenant_finds_that_order():
    result = await lookup_orders(ctx("acme"), "where is A-1001?")
    assert result["found"] is True
    assert result["order"]["id"] == "A-1001" and result["order"]["item"] == "Rocket skates"


async def test_without_an_order_id_the_most_recent_order_is_chosen():
    result = await lookup_orders(ctx("globex"), "where is my stuff")
    assert result["found"] is True and result["order"]["id"] == "G-2204"  # placed 2026-11-19, the latest
    assert [order["id"] for order in result["orders"]] == ["G-2204", "G-2203", "G-2202", "G-2201"]


@pytest.mark.parametrize(("tenant", "prefix"), [("acme", "A-"), ("globex", "G-")])
async def test_each_tenant_gets_only_its_own_orders(tenant, prefix):
    result = await lookup_orders(ctx(tenant), "anything")
    assert result["orders"] and all(order["id"].startswith(prefix) for order in result["orders"])
    assert result["order"]["id"].startswith(prefix)


async def test_naming_another_tenants_order_finds_nothing():
    result = await lookup_orders(ctx("acme"), "where is G-2201")
    assert result["found"] is False and result["order"] is None
    assert all(order["id"].startswith("A-") for order in result["orders"])


async def test_a_tenant_without_data_finds_nothing():
    result = await lookup_orders(ctx("initech"), "where is A-1001")
    assert result == {"found": False, "order": None, "orders": [], "order_count": 0}


@pytest.mark.parametrize("tenant", ["../globex", "acme/../globex", "ACME", "", "."])
async def test_a_tenant_id_that_could_leave_the_data_folder_is_refused(tenant):
    with pytest.raises(InvalidRequest):
        await lookup_orders(ctx(tenant), "A-1001")


async def test_the_data_folder_can_be_moved_with_an_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "acme").mkdir()
    order = {"id": "A-9", "item": "Test tube", "status": "new", "eta": "2027-01-01", "placed_at": "2026-12-01"}
    (tmp_path / "acme" / "orders.json").write_text(json.dumps([order]))
    monkeypatch.setenv("CORRAL_DEMO_DATA", str(tmp_path))
    reload_settings()
    assert (await lookup_orders(ctx("acme"), "A-9"))["order"] == order
    assert (await lookup_orders(ctx("globex"), "x"))["found"] is False  # no globex folder there


def test_the_shipped_demo_data_differs_per_tenant():
    folder = DATA
    acme = json.loads((folder / "acme" / "orders.json").read_text())
    globex = json.loads((folder / "globex" / "orders.json").read_text())
    for orders in (acme, globex):
        assert 3 <= len(orders) <= 4
        assert all(set(order) == {"id", "amount", "item", "status", "eta", "placed_at"} for order in orders)
    assert not {o["item"] for o in acme} & {o["item"] for o in globex}
    assert all(o["id"].startswith("A-") for o in acme) and all(o["id"].startswith("G-") for o in globex)
