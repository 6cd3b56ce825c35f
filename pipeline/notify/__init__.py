"""Alert delivery to a webhook, committed only after the receiver said yes (delivery.py)."""
