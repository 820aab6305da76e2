"""Monitor: exports what no single service can see — Kafka consumer lag of every group,
month-to-date ledger figures, and the direct-settlement targets — for Prometheus."""
