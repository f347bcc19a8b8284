"""Generate the Python code of every `.proto` under `protos/cryostack/`, next to its source.

    uv run python protos/generate.py          # (re)generate in place
    uv run python protos/generate.py --check  # fail if the checked-in generated code is not current (CI)
    uv run python protos/generate.py --descriptor-set OUT.binpb  # write a FileDescriptorSet (for `lint.sh`)

Uses grpcio-tools' bundled protoc for `*_pb2.py` / `*_pb2_grpc.py` and mypy-protobuf for the `.pyi` stubs, and
writes an empty `__init__.py` into every generated subpackage (never `cryostack/__init__.py`: `cryostack` is a
namespace package shared by the workspace members).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.rpc.status_pb2
import grpc_tools

PROTOS_ROOT = Path(__file__).resolve().parent
SOURCE_PACKAGE = "cryostack"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources() -> list[Path]:
    """Every `.proto` file under `protos/cryostack/`, relative to `protos/`, sorted."""
    return sorted(p.relative_to(PROTOS_ROOT) for p in (PROTOS_ROOT / SOURCE_PACKAGE).rglob("*.proto"))


def include_paths() -> list[Path]:
    """Import roots: our tree, protobuf's well-known types, and googleapis' common protos (google/rpc/...)."""
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    googleapis = Path(google.rpc.status_pb2.__file__).resolve().parents[2]
    return [PROTOS_ROOT, well_known, googleapis]


def _plugin(name: str) -> Path:
    """Path of a protoc plugin installed beside this interpreter (mypy-protobuf's entry points)."""
    candidate = Path(sys.executable).parent / name
    found = candidate if candidate.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found; install the root dev group (uv sync) to get mypy-protobuf")
    return Path(found)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every source into `out_dir` and add the subpackages' `__init__.py`; return the sources."""
    sources = proto_sources()
    if not sources:
        raise SystemExit(f"no .proto files under {PROTOS_ROOT / SOURCE_PACKAGE}")
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        *(f"--proto_path={path}" for path in include_paths()),
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(source) for source in sources),
    ]
    result = subprocess.run(command, cwd=PROTOS_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed:\n{result.stderr}")
    for source in sources:
        package_dir = out_dir / source.parent
        while package_dir != out_dir / SOURCE_PACKAGE:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    return sources


def write_descriptor_set(path: Path) -> None:
    """Write every source (and its imports) as one FileDescriptorSet with source info, the input `buf lint` reads."""
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        *(f"--proto_path={include}" for include in include_paths()),
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={path.resolve()}",
        *(str(source) for source in proto_sources()),
    ]
    result = subprocess.run(command, cwd=PROTOS_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed:\n{result.stderr}")


def generated_files(root: Path) -> set[Path]:
    """Generated files (and generated subpackages' `__init__.py`) under `root/cryostack`, relative to `root`."""
    package_root = root / SOURCE_PACKAGE
    found = {p.relative_to(root) for p in package_root.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}
    for path in list(found):
        package_dir = path.parent
        while package_dir != Path(SOURCE_PACKAGE):
            init = package_dir / "__init__.py"
            if (root / init).exists():
                found.add(init)
            package_dir = package_dir.parent
    return found


def check() -> int:
    """Regenerate into a temporary folder and report every file that differs from, or is missing in, the tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = generated_files(fresh_root)
        current = generated_files(PROTOS_ROOT)
        problems = [f"missing: {p}" for p in sorted(fresh - current)]
        problems += [f"stale (no .proto source): {p}" for p in sorted(current - fresh)]
        problems += [
            f"out of date: {p}"
            for p in sorted(fresh & current)
            if not filecmp.cmp(fresh_root / p, PROTOS_ROOT / p, shallow=False)
        ]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("generated code is not current: run `uv run python protos/generate.py`", file=sys.stderr)
        return 1
    print("generated code is current")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Generate in place; or only verify that the generated code is current; or only write a descriptor set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify instead of writing; exit 1 if anything differs")
    parser.add_argument("--descriptor-set", type=Path, metavar="PATH", help="only write a FileDescriptorSet to PATH")
    args = parser.parse_args(argv)
    if args.descriptor_set:
        write_descriptor_set(args.descriptor_set)
        return 0
    if args.check:
        return check()
    for path in generated_files(PROTOS_ROOT):
        if path.name != "__init__.py":
            (PROTOS_ROOT / path).unlink()
    sources = generate(PROTOS_ROOT)
    print(f"generated code for {len(sources)} proto file(s) under {PROTOS_ROOT / SOURCE_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
