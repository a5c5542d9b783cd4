"""`python -m forgeline_operator`: run the operator (kopf) with settings from FORGELINE_* env vars.

Registers the handlers (`handlers.registry`) and runs kopf with one `Runtime` as the operator's
memo, plus: the namespaces to watch (FORGELINE_WATCH_NAMESPACES), peering for a standby replica
(FORGELINE_PEERING) and the health endpoint (FORGELINE_HEALTH_PORT, /healthz) used by the
liveness and readiness probes.
"""

from __future__ import annotations

import logging
import os
import socket
import sys


def identity() -> str:
    """This operator's name among peers: the pod's name (its hostname) and pid. kopf's default asks
    the password database for the user's name, which a container running as an arbitrary UID (the
    chart's 65532) does not have: the operator crashed at start-up in a pod."""
    return f"{socket.gethostname()}/{os.getpid()}"


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
        identity=identity(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
