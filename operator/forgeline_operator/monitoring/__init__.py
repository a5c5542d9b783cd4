"""Monitoring as code: the Grafana dashboard the Helm chart ships (`make dashboards`).

A development tool only: the operator never imports this package, and its one dependency,
grafana-foundation-sdk, is in the `dev` extra.
"""
