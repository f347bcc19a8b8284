"""Contract of the proto sources themselves: every declaration has a comment, every parameter's comment states its
default, and the generated code is current."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from cryostack.particles.v1 import particles_pb2

from contract_tables import (
    CONTRACT_FILES,
    EXPECTED_PARAMETERS,
    GENERATE,
    REPO_ROOT,
    STAGE_MODULES,
    T,
)


@pytest.fixture(scope="module")
def source_comments(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[tuple[int, ...], str]]:
    """Leading comments of every declaration in the contract files, by file name and source-info path."""
    descriptor_set_path = tmp_path_factory.mktemp("descriptors") / "image.binpb"
    _run_generate("--descriptor-set", str(descriptor_set_path))
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path.read_bytes())
    return {
        file.name: {
            tuple(location.path): location.leading_comments.strip() for location in file.source_code_info.location
        }
        for file in descriptor_set.file
        if file.name in CONTRACT_FILES
    }


def test_every_declaration_has_a_comment(source_comments: dict[str, dict[tuple[int, ...], str]]) -> None:
    assert set(source_comments) == CONTRACT_FILES
    for module in (*STAGE_MODULES, particles_pb2):
        file_proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file_proto)
        comments = source_comments[file_proto.name]
        for path, name in _declarations(file_proto):
            assert comments.get(path), f"{file_proto.name}: {name} has no comment"


def test_parameter_comments_state_the_default(source_comments: dict[str, dict[tuple[int, ...], str]]) -> None:
    for message, expected in EXPECTED_PARAMETERS.items():
        comments = source_comments[message.file.name]
        for field in message.fields:
            comment = comments[_field_path(message, field)]
            default = expected[field.name][1]
            where = f"{message.full_name}.{field.name}"
            if default is not None:
                assert re.search(rf"Default {re.escape(default)}(?!\w|\.\d)", comment), f"{where}: {comment!r}"
            elif field.has_presence and field.type != T.TYPE_MESSAGE and field.containing_oneof is None:
                assert "Unset" in comment or "unset" in comment, f"{where} does not say what unset means"


def test_generated_code_is_current() -> None:
    result = _run_generate("--check")
    assert "generated code is current" in result.stdout


def _run_generate(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the project's codegen command (protos/generate.py) with this interpreter and fail on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(GENERATE), *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _declarations(file_proto: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    """Source-info paths and names of every message, field, oneof, enum, enum value, service and RPC of a file."""
    for index, service in enumerate(file_proto.service):
        yield (6, index), service.name
        for method_index, method in enumerate(service.method):
            yield (6, index, 2, method_index), f"{service.name}.{method.name}"
    for index, enum in enumerate(file_proto.enum_type):
        yield from _enum_declarations((5, index), enum)
    for index, message in enumerate(file_proto.message_type):
        yield from _message_declarations((4, index), message)


def _message_declarations(
    path: tuple[int, ...], message: descriptor_pb2.DescriptorProto
) -> Iterator[tuple[tuple[int, ...], str]]:
    """Paths and names of a message and everything declared inside it."""
    yield path, message.name
    for index, field in enumerate(message.field):
        yield (*path, 2, index), f"{message.name}.{field.name}"
    for index, oneof in enumerate(message.oneof_decl):
        if not oneof.name.startswith("_"):  # proto3 `optional` fields get synthetic oneofs named "_<field>"
            yield (*path, 8, index), f"{message.name}.{oneof.name}"
    for index, nested in enumerate(message.nested_type):
        yield from _message_declarations((*path, 3, index), nested)
    for index, enum in enumerate(message.enum_type):
        yield from _enum_declarations((*path, 4, index), enum)


def _enum_declarations(
    path: tuple[int, ...], enum: descriptor_pb2.EnumDescriptorProto
) -> Iterator[tuple[tuple[int, ...], str]]:
    """Paths and names of an enum and its values."""
    yield path, enum.name
    for index, value in enumerate(enum.value):
        yield (*path, 2, index), f"{enum.name}.{value.name}"


def _field_path(message: Descriptor, field: FieldDescriptor) -> tuple[int, ...]:
    """Source-info path of a field of a top-level message."""
    assert message.containing_type is None, "parameter messages are top-level"
    file_proto = descriptor_pb2.FileDescriptorProto()
    message.file.CopyToProto(file_proto)
    message_index = [declared.name for declared in file_proto.message_type].index(message.name)
    return (4, message_index, 2, field.index)
