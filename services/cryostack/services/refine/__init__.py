"""Refinement service: heterogeneous and homogeneous (gold-standard) refinement, outputs and gRPC servicer."""
