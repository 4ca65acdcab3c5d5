"""``losslab audit``: check a fine-tuning setup's loss masks, normalisation and loss scale.

Records (``docs/audit.md``): :func:`~losslab.audit.records.audit_records` (losslab's mask of each
record, the dataset checks, another framework's labels compared token by token),
:func:`~losslab.audit.dump.dump_labels` (write those labels from a dataset or a collator),
:data:`~losslab.audit.kinds.KINDS` (the finding kinds and their levels); reports are
:class:`~losslab.audit.findings.AuditReport` objects, rendered by :mod:`losslab.audit.render`.
"""
