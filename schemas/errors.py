"""Stable error codes: every rejection names one.

The hospital sees `infcode = -1` and `err_msg = "<CODE>: <text>"`. Texts never
contain personal identifiers (ID numbers, names); field names and codes only.
The README's error table is generated from ERRORS (python -m schemas.errors).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorSpec:
    code: str
    meaning: str
    transactions: str  # the README shows the registry's infnos instead when a transaction answers the code
    action: str


ERRORS: dict[str, ErrorSpec] = {
    e.code: e
    for e in (
        ErrorSpec("ENVELOPE_MALFORMED", "the request is not JSON or an envelope field is missing or of the "
                  "wrong type (the field is named)", "all", "fix the message and resend with a new msgid"),
        ErrorSpec("BODY_TOO_LARGE", "the HTTP body exceeds the size limit", "all", "split the upload"),
        ErrorSpec("INFNO_UNSUPPORTED", "this broker does not handle that transaction number", "all",
                  "send it to the platform that handles it"),
        ErrorSpec("MSGID_MALFORMED", "msgid is not 30 alphanumerics starting with fixmedins_code", "all",
                  "build msgid as fixmedins_code + yyyyMMddHHmmss + 4-digit sequence"),
        ErrorSpec("BODY_MALFORMED", "the `input` body is missing a field, has a wrong type, an unknown code "
                  "value, a bad amount or date (the field is named)", "all", "fix the body and resend"),
        ErrorSpec("INSUPLC_REQUIRED", "the body carries psn_no but the envelope has no insuplc_admdvs",
                  "2401-2305", "take insuplc_admdvs from 1101 and resend"),
        ErrorSpec("INSUPLC_MISMATCH", "insuplc_admdvs differs from the person's insured region",
                  "2401-2305", "query 1101 again and use its insuplc_admdvs"),
        ErrorSpec("MDTRTAREA_MISMATCH", "mdtrtarea_admvs differs from the hospital's region", "all",
                  "send your own region code"),
        ErrorSpec("HOSPITAL_UNKNOWN", "fixmedins_code is not a connected hospital", "all",
                  "check the hospital code; contact the treating region's agency"),
        ErrorSpec("PERSON_UNKNOWN", "no insured person with that psn_no or certificate", "1101, 2401-2305",
                  "check the certificate; query 1101"),
        ErrorSpec("REGION_UNKNOWN", "an admdvs code is not in the region table", "all", "check the code"),
        ErrorSpec("CATALOG_ITEM_UNKNOWN", "med_list_codg is not in the treating region's catalog",
                  "2301", "map the item to the catalog and re-upload"),
        ErrorSpec("TOO_MANY_FEE_ITEMS", "more fee items in one upload than allowed", "2301",
                  "split the upload"),
        ErrorSpec("FEE_ITEM_INCONSISTENT", "det_item_fee_sumamt differs from cnt × pric, or the item's "
                  "mdtrt_id/psn_no differs from the visit's", "2301", "fix the item"),
        ErrorSpec("FEE_ITEM_DUPLICATE", "feedetl_sn already uploaded for this visit with other content",
                  "2301", "cancel it with 2302 first or use a new feedetl_sn"),
        ErrorSpec("FILING_REQUIRED", "non-local care needs a cross-region filing (备案) in force for the "
                  "treating province", "2303, 2304", "file online (or send promise_filing_flag=1) and resend;"
                  " otherwise the person claims manually"),
        ErrorSpec("INSUTYPE_MISMATCH", "insutype differs from the person's insurance", "2401-2305",
                  "use the insutype from 1101"),
        ErrorSpec("VISIT_UNKNOWN", "no visit with that mdtrt_id for this person and hospital",
                  "2301-2305, 2402, 2404", "check mdtrt_id"),
        ErrorSpec("VISIT_CANCELLED", "the visit (registration or admission) was cancelled", "2202-2208, 2301-2405",
                  "register or admit again"),
        ErrorSpec("VISIT_SETTLED", "the visit is settled: fees, discharge, cancellation and a second settlement "
                  "are refused", "2202-2207, 2301-2304, 2402-2405", "reverse the settlement first (2208/2305)"),
        ErrorSpec("VISIT_NOT_DISCHARGED", "inpatient settlement or discharge cancellation needs a discharged stay",
                  "2304, 2405", "send the discharge (2402) first"),
        ErrorSpec("VISIT_DISCHARGED", "the stay is already discharged", "2402", "cancel the discharge (2405) first"),
        ErrorSpec("VISIT_TYPE_MISMATCH", "the transaction does not fit the visit (outpatient vs inpatient)",
                  "2202-2208, 2301-2305, 2402-2405", "use the outpatient (22xx) or inpatient (23xx/24xx) numbers"),
        ErrorSpec("FILING_UNKNOWN", "no filing with that filing_id for this person", "2502", "check filing_id (5301)"),
        ErrorSpec("MEDFEE_MISMATCH", "medfee_sumamt differs from the sum of uploaded fee items",
                  "2303, 2304", "re-upload fees or correct medfee_sumamt"),
        ErrorSpec("NO_FEES", "the visit has no uploaded fee items", "2303, 2304", "upload fees first"),
        ErrorSpec("SETTLEMENT_UNKNOWN", "no settlement with that setl_id for this visit and hospital",
                  "2305", "check setl_id"),
        ErrorSpec("SETTLEMENT_REVERSED", "the settlement was already reversed", "2305", "nothing to do"),
        ErrorSpec("MED_TYPE_UNSUPPORTED", "med_type is not valid for this transaction", "2203, 2206, 2207, 2401",
                  "inpatient uses 21; outpatient 11 or 14 (declared in 2203)"),
        ErrorSpec("CHRONIC_DISEASE_NOT_COVERED", "the person has no eligibility (慢特病备案) for that chronic disease, "
                  "or the insured region's policy does not cover it", "2203, 2206, 2207",
                  "register the eligibility (2503) or settle as general outpatient (11)"),
        # Mid-stay settlement (README "Mid-stay settlement").
        ErrorSpec("MID_SETTLEMENT_NOT_LATEST", "only the latest settlement of a stay not yet reversed may be "
                  "reversed (a later mid-stay part continued from it)", "2305",
                  "reverse the later parts first, newest first"),
        ErrorSpec("FEE_ITEM_SETTLED", "the fee item was settled by a mid-stay part and cannot be cancelled",
                  "2302", "reverse that part first (2305), or leave the item"),
        ErrorSpec("VISIT_PART_SETTLED", "the stay has mid-stay parts settled: it cannot be cancelled", "2404",
                  "reverse the parts first (2305, newest first)"),
        # Trust (README "Security"): who sent it, when, and whether it was seen before.
        ErrorSpec("SIGNATURE_MISSING", "no signature: `cainfo` is empty or `signtype` is not SM3", "all",
                  "sign the envelope with your institution key (HMAC-SM3, README Security)"),
        ErrorSpec("SIGNATURE_INVALID", "the signature does not match the bytes received with any live key of the "
                  "institution named (tampered, or signed with another key)", "all",
                  "sign the exact bytes you send with your current key"),
        ErrorSpec("KEY_UNKNOWN", "the institution named has no live key", "all",
                  "ask the treating region's agency to issue a key"),
        ErrorSpec("KEY_REVOKED", "signed with a key that is revoked or past its rotation overlap", "all",
                  "sign with the key issued last"),
        ErrorSpec("INF_TIME_OUT_OF_WINDOW", "inf_time is further from the broker's clock than the signature "
                  "window allows (a replay, or a wrong clock)", "all",
                  "set inf_time to the sending time (check the clock) and sign again"),
        ErrorSpec("MSGID_CONFLICT", "this msgid was already used for a different request", "all",
                  "use a new msgid; resend the same msgid only with the same content"),
        ErrorSpec("SIGN_NO_INVALID", "sign_no is not a live sign-in (9001) session of this institution", "all",
                  "sign in with 9001 and use its sign_no"),
        ErrorSpec("CLIENT_CERT_MISMATCH", "the request came with a client certificate (mutual TLS) of another "
                  "institution than fixmedins_code names", "all",
                  "send over the connection of your own certificate"),
        ErrorSpec("INSTITUTION_NOT_ALLOWED", "this kind of institution may not send this transaction (pharmacies "
                  "(P…) send purchases 21xx, hospitals (H…) visits 22xx–24xx, an agency (A…) only 9001, 9002 and "
                  "3260–3262)", "all",
                  "send the transaction of your kind of institution"),
        ErrorSpec("RATE_LIMITED", "too many person look-ups (1101) from this institution in the last minute",
                  "1101", "wait and retry; look up only persons you treat"),
        ErrorSpec("TIMEOUT", "no answer within the gateway's time limit; the transaction may still "
                  "complete", "all", "resend with the same msgid: it returns the stored result"),
        ErrorSpec("INTERNAL", "an unexpected error inside the broker", "all",
                  "resend with the same msgid; report if it persists"),
        # Corrections (2601 冲正, README "Corrections (2601)").
        ErrorSpec("CORRECTION_NOT_SUPPORTED", "oinfno is not a transaction a correction can undo", "2601",
                  "undo it with its own cancellation or reversal, if it has one"),
        ErrorSpec("ORIGINAL_OTHER_INSTITUTION", "omsgid is not a msgid of the sending institution (its first 12 "
                  "characters are not fixmedins_code)", "2601", "correct only your own transactions"),
        ErrorSpec("ORIGINAL_UNKNOWN", "no transaction with that omsgid reached the settlement engine; it is now "
                  "recorded as corrected, so it is refused (ORIGINAL_CORRECTED) if it arrives later", "2601",
                  "nothing was charged: send the transaction again with a new msgid if it is still wanted"),
        ErrorSpec("ORIGINAL_MISMATCH", "oinfno or psn_no differ from the original transaction's", "2601",
                  "send the original's infno and psn_no"),
        ErrorSpec("ORIGINAL_UNDONE", "the original was already undone by another transaction (a reversal, a "
                  "cancellation)", "2601", "nothing to do"),
        ErrorSpec("CORRECTION_NOT_ALLOWED", "the original can no longer be undone: its visit is settled (a fee "
                  "upload, registration, admission or discharge of a settled visit), or a later mid-stay part "
                  "continued from it or settled its items", "2601",
                  "reverse the settlement (or the later parts, newest first) first, then correct"),
        ErrorSpec("ORIGINAL_CORRECTED", "this msgid was corrected (2601) before it arrived: it is never applied",
                  "2201, 2204, 2207, 2301, 2304, 2102, 2401, 2402", "nothing was charged: send it again with a new "
                  "msgid if it is still wanted"),
        # Reconciliation and clearing (services/clearing).
        ErrorSpec("MONTH_CLOSED", "the clearing month is closed: nothing in it changes any more (late "
                  "reversals count as adjustments of the next open month)", "3204",
                  "nothing to withdraw; settle differences in the next month"),
        ErrorSpec("MONTH_NOT_CLOSED", "the clearing month is not closed yet: its details are final only after "
                  "the close", "3260, 3261, 3262", "ask again after the month is closed"),
        ErrorSpec("APPLICATION_MISMATCH", "the clearing application's person-times or amounts differ from the "
                  "ledger (the fields are named)", "3203", "reconcile with 3201/3202 first, then apply again"),
        ErrorSpec("APPLICATION_UNKNOWN", "no clearing application with that clr_appy_evt_id for this hospital",
                  "3204", "check clr_appy_evt_id"),
        ErrorSpec("CONFIRMATION_MISMATCH", "the confirmation does not match the month's clearing details (row "
                  "count, unknown setl_sn or amounts; counts are named)", "3261",
                  "pull the details again (3260) and confirm what they list"),
        ErrorSpec("CONFIRMATION_UNKNOWN", "no confirmation with that otransid for this sender and month (an "
                  "agency: also its institutions')", "3262",
                  "use the msgid of the 3261 that confirmed"),
        # Clearing at national shape (3261 in batches, the agency's scope).
        ErrorSpec("CONFIRMATION_BATCH_SIZE", "a 3261 batch lists 1 to 100 rows (`detail`); a month is confirmed by "
                  "several batches", "3261", "split the month's rows into batches of at most 100"),
        ErrorSpec("CONFIRMATION_ROW_UNKNOWN", "a setl_sn of the batch is not a clearing row of that month for this "
                  "institution (an agency: of its region's institutions); the index is named, nothing is confirmed",
                  "3261", "confirm only rows that 3260 lists for the same month"),
        ErrorSpec("STATEMENT_UNKNOWN", "no clearing statement for that month (or version)", "clearing CLI",
                  "close the month first, or ask for the running positions"),
        # Queries (5201–5206, services/settle/queries.py).
        ErrorSpec("QUERY_NOT_ALLOWED", "the person has no visit at this institution: their accumulators are not "
                  "shown", "5206", "query only persons you treat; 1101 shows a person's own totals"),
        # Smart monitoring: disposals of pre/in-event warnings (3103, services/settle/prescreen.py).
        ErrorSpec("WARNING_UNKNOWN", "no warning with that jr_id was issued for this person (3101/3102 issue "
                  "them)", "3103", "use a jr_id from a 3101/3102 answer for the same patn_id"),
        ErrorSpec("WARNING_OTHER_INSTITUTION", "the warning was issued to another institution", "3103",
                  "dispose only of warnings your own 3101/3102 received"),
        ErrorSpec("CLAIM_LOCAL", "a manual claim whose insured and treating pooling regions are the same; only "
                  "non-local claims count", "fsi.manual_claims", "do not report local claims"),
    )
}


class BrokerError(Exception):
    """A rejection with a stable code. `message` must not contain personal identifiers."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def err_msg(self) -> str:
        return f"{self.code}: {self.message}"


def markdown_table() -> str:
    """The README table; its "transactions" column comes from the transaction registry, and
    `ErrorSpec.transactions` only names where a code occurs outside hospital transactions."""
    from schemas.transactions import transactions_column  # the registry imports every body schema

    rows = ["| code | meaning | transactions | what the hospital should do |", "|---|---|---|---|"]
    rows += [f"| `{e.code}` | {e.meaning} | {transactions_column(e.code) or e.transactions} | {e.action} |"
             for e in ERRORS.values()]
    return "\n".join(rows)


README_BEGIN = "<!-- error-codes:begin (python -m schemas.errors --write README.md) -->"
README_END = "<!-- error-codes:end -->"


def readme_with_table(text: str) -> str:
    """`text` with the block between the README markers replaced by the current table."""
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    if not rest:
        raise ValueError("README has no error-code markers")
    return f"{head}{README_BEGIN}\n{markdown_table()}\n{README_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        path = Path(sys.argv[2])
        path.write_text(readme_with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(markdown_table())
