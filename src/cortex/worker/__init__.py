"""The worker: one process that loads a predictor and runs it on leased batches."""
