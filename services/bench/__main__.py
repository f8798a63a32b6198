"""``python -m services.bench raw-hop SUBJECT [FORWARD]``: one process of the raw chain."""

import asyncio
import sys

from services.bench.raw import run_hop

if __name__ == "__main__":
    if sys.argv[1:2] != ["raw-hop"]:
        raise SystemExit("usage: python -m services.bench raw-hop SUBJECT [FORWARD]")
    asyncio.run(run_hop(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
