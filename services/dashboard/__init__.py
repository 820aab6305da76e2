"""Dashboard for clearing staff (https://127.0.0.1:8090/, after sign-in): direct-settlement rates against
targets, trends, clearing positions, deposits, and the broker's throughput, latency and
errors right now. Authoritative month figures come from PostgreSQL; live figures from
Prometheus. Page assets are served from services/dashboard/static (no internet needed)."""
