"""The drift scenarios of ``triage datagen --shift`` by name, with what each changes (applied
in model/shifts.py). Apart from the generator so that the command line lists them without
importing NumPy."""

SCENARIOS: dict[str, str] = {
    "night-orders": "20% of orders move into 00:00-04:59 of their day",
    "stockouts": "SKUs taking ~10% of orders are out of stock all period (~6% -> ~15%)",
    "payment-failures": "~5% more orders have a failed payment status (not OK ~5% -> ~10%)",
    "zip-rollback": "zips taking ~10% of orders are withdrawn (availability ~0.9 -> ~0.8)",
    "new-payment-status": "~2% of orders show AWAITING_3DS, a status training never saw",
    "customer-bursts": "~3% of orders come in bursts: one customer, 5 consecutive orders of "
                       "the store, each to another zip",
}
