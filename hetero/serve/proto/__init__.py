"""The Open Inference Protocol's gRPC service: its .proto, and the code protoc generated from it (the .proto says how)."""
