-- Per-service roles (README "Security" › PostgreSQL): what each service may do in a shard database,
-- derived from its code (see hub 0007.roles.sql for the roles themselves).

DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO xs_router, xs_settle, xs_clearing, xs_monitor, xs_dashboard',
                   current_database());
END
$$;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO xs_router, xs_settle, xs_clearing, xs_monitor, xs_dashboard;

-- Router: reads persons, filings, balances and accumulators (1101, routing); writes filings (2501/2502)
-- and a person's online chronic-disease eligibility (2503/2504) — those two columns only. It can not
-- write the ledger (settlement, ledger_daily, visit, fee_item, accumulator, account, processed_request).
GRANT SELECT ON person, filing, account, accumulator TO xs_router;
GRANT INSERT ON filing TO xs_router;
GRANT UPDATE (revoked) ON filing TO xs_router;
GRANT UPDATE (chronic_online, chronic) ON person TO xs_router;

-- Settlement engine: the ledger and everything settled with it, in one transaction per batch. Ledger rows
-- and answered requests are only ever added.
GRANT SELECT, INSERT, UPDATE ON visit, fee_item, accumulator, account, ledger_daily TO xs_settle;
GRANT SELECT, INSERT ON settlement, settlement_key, processed_request TO xs_settle;

-- Clearing reconciles against the ledger; monitor and dashboard read the daily aggregates and the ledger.
GRANT SELECT ON settlement, ledger_daily TO xs_clearing, xs_monitor, xs_dashboard;

-- The monitor creates next months' ledger partitions ahead: through this function only, which runs as
-- its owner (a fixed search_path, so no caller's object can stand in for one it names).
ALTER FUNCTION ensure_ledger_partitions(date, date) SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE EXECUTE ON FUNCTION ensure_ledger_partitions(date, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ensure_ledger_partitions(date, date) TO xs_monitor;
