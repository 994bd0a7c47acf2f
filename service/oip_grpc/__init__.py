"""Generated stubs of the Open Inference Protocol over gRPC (`inference.GRPCInferenceService`):
the `.proto` beside them, its source and the command that regenerates them are in README.md.

Not imported by `marginwatch.service` unless `grpc_port` is set (see `grpc_server.py`): the
messages register in protobuf's default pool under the same names as tritonclient's.
"""
