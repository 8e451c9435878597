"""Prism gRPC contract: generated stubs for the `prism.v1` protos."""
