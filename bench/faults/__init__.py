"""The fault suite: chert-relay's promise under crashes, outages and floods, with real
processes only. Run ``python -m bench.faults --events N`` (``make faults``)."""
