"""The scripts behind the README's "where a run's time goes": each runs and accounts for what it says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hop_trace.py"


def test_the_hop_trace_splits_a_run_into_every_process_step():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "40"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    steps = [line for line in lines if re.match(r"^(client|router|graph|tools) ", line)]
    roles = [line.split()[0] for line in steps]
    # How the processes' marks interleave depends on the machine's speed (on a busy one a
    # process's last mark of the previous run can fall after the client began the next), so
    # only what holds whatever the timing is asserted: a run begins and ends at the client and
    # passes through every service, the tools service reading, handling and writing.
    assert roles[0] == "client" and roles[-1] == "client"
    assert set(roles) == {"client", "router", "graph", "tools"}
    assert roles.count("tools") >= 3
    assert "whole run" in result.stdout
    walls = [float(re.findall(r"\d+\.\d", line)[0]) for line in steps]  # wall, then CPU if any
    assert all(wall >= 0 for wall in walls)


def test_the_dispatch_cost_script_measures_each_service():
    script = SCRIPT.parent / "dispatch_cost.py"
    result = subprocess.run([sys.executable, str(script), "--count", "50"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    costs = dict(line.split()[:2] for line in result.stdout.splitlines())
    assert set(costs) == {"router", "graph", "tools"}
    assert all(float(cost) > 0 for cost in costs.values())


def test_the_noisy_neighbour_script_measures_a_quiet_tenant_under_a_flood():
    script = SCRIPT.parent / "noisy_neighbour.py"
    result = subprocess.run(
        [sys.executable, str(script), "--requests", "30", "--rounds", "1", "--rate", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["quiet_lost"] == 0  # the quiet tenant loses nothing, whatever the timings
    assert report["noisy"]["sent"] > 0 and report["noisy"]["refused"] > 0  # the flood went past its limit
    assert report["noisy"]["answered"] == report["noisy"]["sent"]  # every refusal is an answer
    assert report["quiet_p99_ms_flooded"] > 0 and report["p99_ratio"] > 0
    assert report["p99_ratio_control"] > 0 and report["p99_ratio_at_limit"] > 0
