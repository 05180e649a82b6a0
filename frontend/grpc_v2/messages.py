"""The KServe v2 gRPC messages (``inference.proto``), built in a descriptor pool of
their own (gen.py says why): ``pb.ModelInferRequest``, ``pb.DataType.Value(...)`` ..."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ringserve.frontend.grpc_v2.descriptor import FILE_DESCRIPTOR

SERVICE = "inference.GRPCInferenceService"

POOL = descriptor_pool.DescriptorPool()
POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(FILE_DESCRIPTOR))
FILE = POOL.FindFileByName("inference.proto")


def _classes() -> dict[str, Any]:
    found: dict[str, Any] = {
        name: message_factory.GetMessageClass(d) for name, d in FILE.message_types_by_name.items()
    }
    found.update(FILE.enum_types_by_name)  # enum descriptors: .values_by_name
    return found


pb: Any = SimpleNamespace(**_classes())

# Each method: (request class, response class, streaming both ways)
METHODS: dict[str, tuple[Any, Any, bool]] = {
    m.name: (
        message_factory.GetMessageClass(m.input_type),
        message_factory.GetMessageClass(m.output_type),
        m.client_streaming,
    )
    for m in FILE.services_by_name["GRPCInferenceService"].methods
}
