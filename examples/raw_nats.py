"""A request to Corral with nothing but nats-py: python raw_nats.py NATS_URL TENANT TOKEN [TEXT]."""

import asyncio
import base64
import json
import sys
import uuid

import nats


async def main(url: str, tenant: str, token: str, text: str = "where is my order?") -> None:
    claims = token.split(".")[1]
    sub = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["sub"]
    me = base64.b32encode(sub.encode()).decode().rstrip("=").lower()  # the principal's subject token
    nc = await nats.connect(url, token=token, inbox_prefix=f"_INBOX.{tenant}.{me}")  # replies come here

    async def on_event(msg):
        event = json.loads(msg.data)["payload"]
        print("event", event["type"], event["node"] or "", json.dumps(event["data"]))

    run_id = uuid.uuid4().hex
    await nc.subscribe(f"t.{tenant}.events.{me}.{run_id}", cb=on_event)  # before the request
    request = {"kind": "request", "tenant_id": tenant, "run_id": run_id, "payload": {"input": {"text": text}}}
    reply = await nc.request(f"t.{tenant}.router.request.{me}", json.dumps(request).encode(), timeout=10)
    await nc.drain()  # the events still queued are printed first
    envelope = json.loads(reply.data)
    print(envelope["kind"], json.dumps(envelope["payload"]))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
