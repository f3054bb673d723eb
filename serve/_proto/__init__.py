"""Generated protobuf / gRPC modules; regenerate with ``python -m adapterhub.serve.protogen``."""
