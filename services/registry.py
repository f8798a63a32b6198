"""The one list of Corral's services.

Adding a service is a folder ``services/<name>/`` with a ``manifest.py`` (see
``services/runtime/manifest.py``) and a ``__main__.py``, and one line here: the broker
permissions, ``corral up``'s processes and ``--scale`` names, the state directory's credentials,
the AsyncAPI document and the compose file's check all follow from this list.
"""

from __future__ import annotations

from services.auth.manifest import MANIFEST as AUTH
from services.graph.manifest import MANIFEST as GRAPH
from services.monitor.manifest import MANIFEST as MONITOR
from services.router.manifest import MANIFEST as ROUTER
from services.runtime.manifest import Manifest
from services.swarm.manifest import MANIFEST as SWARM
from services.tools.manifest import MANIFEST as TOOLS
from services.workflow.manifest import MANIFEST as WORKFLOW

SERVICES: tuple[Manifest, ...] = (AUTH, ROUTER, GRAPH, TOOLS, WORKFLOW, SWARM, MONITOR)
BY_NAME: dict[str, Manifest] = {manifest.name: manifest for manifest in SERVICES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
