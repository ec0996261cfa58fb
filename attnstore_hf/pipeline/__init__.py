"""The layer-wise pipeline: restore layer i+1 while layer i computes; save without blocking compute."""
