"""`python -m forgeline_operator`: run the operator (kopf) with settings from FORGELINE_* env vars.

Equivalent to `kopf run -m forgeline_operator.handlers` plus: the namespaces to watch
(FORGELINE_WATCH_NAMESPACES), peering for a standby replica (FORGELINE_PEERING) and the health
endpoint (FORGELINE_HEALTH_PORT, /healthz) used by the liveness and readiness probes.
"""

from __future__ import annotations

import logging
import sys


def main() -> int:
    import kopf

    from . import handlers  # noqa: F401 - registers the handlers
    from .settings import OperatorSettings

    s = OperatorSettings()
    logging.basicConfig(
        level=getattr(logging, s.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    namespaces = s.namespaces()
    kopf.run(
        clusterwide=not namespaces,
        namespaces=tuple(namespaces),
        standalone=s.peering is None,
        peering_name=s.peering,
        liveness_endpoint=f"http://0.0.0.0:{s.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
