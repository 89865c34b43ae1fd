# tests/integration/observability.rs: prometheus_client's OpenMetrics parser
# checks what /metrics serves.
pip_needs prometheus_client.openmetrics.parser 'prometheus-client>=0.20,<1'
