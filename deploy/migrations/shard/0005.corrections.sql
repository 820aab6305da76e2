-- Corrections (2601 冲正, README "Corrections (2601)"): each corrected msgid once, with the first
-- correction's answer. A later correction of the same omsgid answers the same; an original arriving after
-- its correction (the hospital timed out, corrected, and the original was still on its way) finds its
-- msgid here and is refused (ORIGINAL_CORRECTED), never applied.

CREATE TABLE correction (
    omsgid         text     PRIMARY KEY,          -- the corrected msgid
    msgid          text     NOT NULL UNIQUE,      -- the first 2601 that corrected it
    oinfno         text     NOT NULL,
    fixmedins_code text     NOT NULL,
    undone         text     NOT NULL CHECK (undone IN ('reverse', 'cancel_visit', 'cancel_discharge',
                                                       'withdraw_fees', 'none', 'unknown')),
    output         bytea,                         -- the answer's `output` (JSON) when it succeeded ...
    err_msg        text,                          -- ... or its refusal (ORIGINAL_UNKNOWN)
    corrected_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((output IS NULL) <> (err_msg IS NULL))
);

-- The visit a request acted on (or created): a correction of a discharge (2402) finds its stay here, the
-- only original whose answer and rows do not name it. NULL for requests naming no visit.
ALTER TABLE processed_request ADD COLUMN mdtrt_id text;

-- A fee upload's items by the upload's msgid (a correction withdraws exactly those).
CREATE INDEX fee_item_upload ON fee_item (upload_msgid);

-- Only the engine corrects; corrections are only ever added.
GRANT SELECT, INSERT ON correction TO xs_settle;
