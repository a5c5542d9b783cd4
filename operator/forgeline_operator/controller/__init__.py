"""The operator's control loop: what `python -m forgeline_operator` runs under kopf.

The thin kopf handlers (`handlers`), one reconcile step of a job's state machine (`reconciler`),
the operator-wide state handed to every handler (`runtime`), every choice as a pure function
(`decisions`, `failures`, `costs`, `fitcheck`, `storagepolicy`), the phase table (`lifecycle`) and
the job index (`jobindex`), the Ray backends and manifest builders (`backends`, `builders`), the
Prometheus metrics, the Ray job log archive and the FORGELINE_* settings. Import-free on purpose:
import the module you need.
"""
