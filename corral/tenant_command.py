"""``corral tenant add|update|remove|list|show|seed``: the tenant registry, as the operator.

The policies are checked against the deployment's definitions (``--definitions``, else
``CORRAL_DEFINITIONS``, else the state directory's) before they are written, so a tenant naming a
graph or a tool the system does not have is refused here, with the same message the services
would log.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from contracts.definitions import Catalog, TenantPolicy
from contracts.errors import InvalidRequest, NotFound
from corral.tenant_admin import Registry, SeedReport, policies_from, shown

PAST = {"add": "added", "update": "updated", "remove": "removed"}


async def run(
    args: argparse.Namespace, connect: Callable[[], Awaitable[Any]], definitions: Callable[[], list[Path]]
) -> int:
    nc = await connect()
    try:
        registry = await Registry(nc, operator=_operator()).open(create=args.action in ("add", "seed"))
        if args.action == "list":
            return _print_list([shown(listed) for listed in await registry.listing()], args.json)
        if args.action == "show":
            listed = await registry.get(args.tenant)
            if listed is None:
                raise NotFound(f"tenant {args.tenant!r} is not in the registry")
            return _print_one(shown(listed), args.json)
        if args.action == "remove":
            revision = await registry.remove(args.tenant)
            return _said(args, {"tenant": args.tenant, "done": "removed", "revision": revision})
        catalog = _catalog(definitions())
        if args.action == "seed":
            return _seeded(await registry.seed(catalog), args.json)
        policy = await _policy(args, registry, catalog)
        if args.action == "add":
            revision = await registry.add(policy, catalog)
        else:
            revision = await registry.update(policy, catalog, revision=args.revision)
        return _said(args, {"tenant": policy.tenant, "done": PAST[args.action], "revision": revision})
    finally:
        await nc.close()


def _operator() -> str:
    """Who the audit trail names for a change: the operating system's user."""
    return (os.environ.get("USER") or os.environ.get("LOGNAME") or "operator")[:64]


def _catalog(paths: list[Path]) -> Catalog:
    from services.runtime.catalog import load_catalog

    return load_catalog(paths)


async def _policy(args: argparse.Namespace, registry: Registry, catalog: Catalog) -> TenantPolicy:
    if getattr(args, "like", None):
        if args.tenant is None:
            raise InvalidRequest("--like needs the new tenant's id")
        listed = await registry.get(args.like)
        model = listed.entry.policy if listed and listed.entry else catalog.tenants.get(args.like)
        if model is None:
            raise NotFound(f"no tenant {args.like!r} to copy, in the registry or the definitions")
        return _validated({**json.loads(model.model_dump_json()), "tenant": args.tenant})
    if args.file is None:
        raise InvalidRequest("give the policy with --file (or, to add, --like another tenant)")
    try:
        text = args.file.read_text()
        data = json.loads(text) if args.file.suffix == ".json" else yaml.safe_load(text)
    except OSError as error:
        raise InvalidRequest(f"cannot read {args.file}: {error.strerror or error}") from None
    except (ValueError, yaml.YAMLError) as error:
        raise InvalidRequest(f"{args.file} is not YAML or JSON: {error}") from None
    try:
        policies = policies_from(data)
    except ValidationError as error:
        raise InvalidRequest(f"{args.file}: {_problems(error)}") from None
    if args.tenant is not None:
        policies = [p for p in policies if p.tenant == args.tenant]
    if len(policies) != 1:
        which = f"tenant {args.tenant!r}" if args.tenant else "exactly one tenant"
        raise InvalidRequest(f"{args.file} must hold {which} (it holds {len(policies)}); name one")
    return policies[0]


def _validated(data: dict[str, Any]) -> TenantPolicy:
    try:
        return TenantPolicy.model_validate(data)
    except ValidationError as error:
        raise InvalidRequest(_problems(error)) from None


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'policy'}: {e['msg']}" for e in error.errors()[:10])


def _said(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"tenant {answer['tenant']} {answer['done']} (revision {answer['revision']})")
    return 0


def _print_list(rows: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        if row.get("unreadable"):
            print(f"{row['tenant']}  revision {row['revision']}  (unreadable: the services refuse it)")
            continue
        state = "removed" if row["removed"] else f"{len(row['policy']['routes'])} routes"
        print(
            f"{row['tenant']}  {state}  revision {row['revision']}  {row['origin']} ({row['changed_by']}, {row['at']})"
        )
    return 0


def _print_one(row: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(row))
        return 0
    print(yaml.safe_dump(row, sort_keys=False), end="")
    return 0


def _seeded(report: SeedReport, as_json: bool) -> int:
    answer = {
        "created": len(report.created),
        "updated": len(report.updated),
        "unchanged": report.unchanged,
        "kept": report.kept,  # changed by an operator: the file's version was not written
    }
    if as_json:
        print(json.dumps(answer))
    else:
        print(
            f"seeded the registry: {answer['created']} added, {answer['updated']} updated from the files, "
            f"{answer['unchanged']} unchanged"
            + (f"; kept the operator's version of {', '.join(report.kept)}" if report.kept else "")
        )
    return 0
