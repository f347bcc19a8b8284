"""Ab-initio reconstruction service: algorithm, outputs and gRPC servicer."""
