"""Model builders: pure, no I/O (loading weights lives in :mod:`medimg.models.pretrained`)."""
