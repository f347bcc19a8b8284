"""cryostack's I/O layer: object-store access, STAR metadata and MRC stacks."""
