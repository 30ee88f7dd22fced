"""Signed webhooks for finished jobs (POST /jobs with `webhook_url`).

- `events.py`: which job states send which event.
- `signing.py`: each API key's Standard Webhooks secret, and the signed headers.
- `addresses.py`: only https to public addresses (checked at submission and at connect time).
- `sender.py`: one HTTP attempt to the pinned address, bounded in time and size.
- `outbox.py`: deliveries due, claimed with a lease, and their outcome (Redis or in memory).
- `dispatcher.py`: the delivery loop run by every API process.
"""
