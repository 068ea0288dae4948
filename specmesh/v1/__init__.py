"""Generated protobuf/gRPC stubs for specmesh.v1 (do not edit; `specmesh protos`)."""
