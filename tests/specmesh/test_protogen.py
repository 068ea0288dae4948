"""The committed gRPC stubs equal a fresh generation from protos/ (generation works, stubs not stale)."""

from specmesh import protogen


def test_committed_stubs_match_fresh_generation() -> None:
    assert protogen.stale_files() == []


def test_every_proto_declares_the_versioned_package() -> None:
    for proto in protogen.proto_files():
        assert "package specmesh.v1;" in proto.read_text(), proto.name
