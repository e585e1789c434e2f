"""hetero's server: `python -m hetero.serve` answers the Open Inference Protocol (KServe v2) over REST and gRPC,
batching the requests over every device (README, Serving)."""
