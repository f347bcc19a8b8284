"""2D classification with an optional per-class particle cap (SPEC §5.1): algorithm, capped E-step, outputs, service."""
