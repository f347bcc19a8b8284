"""cryostack's stage services: one package per stage, each an algorithm module plus a thin servicer."""
