-- Smart monitoring (issue 13, README "Transactions" › 3101–3103): the catalog's monitoring fields travel
-- with each fee item (so a later settlement's facts carry them as they were when billed), the warnings
-- the engine issued (3101/3102) and the hospitals' disposals of them (3103).

ALTER TABLE fee_item
    ADD COLUMN once_per_day boolean       NOT NULL DEFAULT false,
    ADD COLUMN gender_only  text          NOT NULL DEFAULT '' CHECK (gender_only IN ('', '1', '2')),
    ADD COLUMN supply_days  numeric(7, 2) NOT NULL DEFAULT 1 CHECK (supply_days > 0);

-- A settlement's items (the facts of a replayed settlement, the history of the checks).
CREATE INDEX fee_item_setl ON fee_item (setl_id) WHERE setl_id IS NOT NULL;

-- One row per warning issued by a pre/in-event analysis (3101/3102): 3103 refers to it by jr_id.
CREATE TABLE warning_issued (
    jr_id          text        PRIMARY KEY,
    msgid          text        NOT NULL,           -- the 3101/3102 (or 2206/2303) that issued it first
    infno          text        NOT NULL CHECK (infno IN ('3101', '3102', '2206', '2303')),
    fixmedins_code text        NOT NULL,
    psn_no         text        NOT NULL,
    rule_id        text        NOT NULL,
    mdtrt_id       text        NOT NULL,
    vola_amt_fen   bigint      NOT NULL CHECK (vola_amt_fen >= 0),
    issued_at      timestamptz NOT NULL DEFAULT now()
);

-- The hospital's disposal of a warning (3103): one row per 3103 msgid (a repeat answers the same).
CREATE TABLE warning_disposal (
    msgid          text        PRIMARY KEY,
    jr_id          text        NOT NULL REFERENCES warning_issued (jr_id),
    fixmedins_code text        NOT NULL,
    dspo_way       char(1)     NOT NULL CHECK (dspo_way IN ('1', '2')),  -- 1 continue / 2 change
    dspo_way_rea   text        NOT NULL CHECK (length(dspo_way_rea) <= 500),
    disposed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX warning_disposal_jr ON warning_disposal (jr_id);

-- Only the engine issues warnings and records disposals; both are only ever added. The dashboard reads.
GRANT SELECT, INSERT ON warning_issued, warning_disposal TO xs_settle;
GRANT SELECT ON warning_issued, warning_disposal TO xs_dashboard, xs_monitor;
