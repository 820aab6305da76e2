"""Clearing and reconciliation (REFERENCE §5): hospital day-end reconciliation, monthly inter-region
clearing with frozen statements, advance deposits, manual claims. See services/clearing/logic.py
for the month rule and services/clearing/store.py for why positions are exactly once."""
