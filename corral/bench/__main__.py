"""``python -m corral.bench raw-hop SUBJECT MODE [NEXT]``: one process of the raw chain."""

import sys

from corral.bench.raw import MODES, run_hop
from services.runtime import loop as event_loop

if __name__ == "__main__":
    if sys.argv[1:2] != ["raw-hop"] or len(sys.argv) < 4 or sys.argv[3] not in MODES:
        raise SystemExit(f"usage: python -m corral.bench raw-hop SUBJECT {{{','.join(MODES)}}} [NEXT]")
    event_loop.run(run_hop(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else ""))
