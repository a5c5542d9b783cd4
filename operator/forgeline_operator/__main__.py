"""`python -m forgeline_operator`: run the operator (kopf) with settings from FORGELINE_* env vars.

Registers the handlers (`handlers.registry`) and runs kopf with one `Runtime` as the operator's
memo, plus: the namespaces to watch (FORGELINE_WATCH_NAMESPACES), peering for a standby replica
(FORGELINE_PEERING) and the health endpoint (FORGELINE_HEALTH_PORT, /healthz) used by the
liveness and readiness probes.
"""

from __future__ import annotations

import logging
import sys


def main() -> int:
    import kopf

    from .controller.handlers import registry
    from .controller.runtime import Runtime
    from .controller.settings import OperatorSettings

    s = OperatorSettings()
    logging.basicConfig(
        level=getattr(logging, s.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    namespaces = s.namespaces()
    kopf.run(
        registry=registry(s),
        memo=Runtime(s),
        clusterwide=not namespaces,
        namespaces=tuple(namespaces),
        standalone=s.peering is None,
        peering_name=s.peering,
        liveness_endpoint=f"http://0.0.0.0:{s.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
