"""Regenerate the Python gRPC stubs in flowpipe/_proto from the .proto files in proto/.

Usage: python scripts/gen_protos.py [OUTPUT_DIR]   (default: flowpipe/_proto of this repository)

grpc_tools writes imports that follow the proto paths (``from flow import flow_pb2``); they are
rewritten here, once, to ``from flowpipe._proto.flow import flow_pb2`` so the stubs work from any
directory without touching sys.path. The output depends only on the .proto files and the
grpcio-tools version, so running this twice gives byte-identical files.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "flowpipe" / "_proto"
IMPORT_PREFIX = "flowpipe._proto"

# Suffixes of the files protoc writes; anything else in the output tree is left alone.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

PACKAGE_INIT = (
    '"""Generated stubs of the Hubble `{pkg}` proto package (scripts/gen_protos.py; do not edit)."""\n'
)
ROOT_INIT = (
    '"""Generated Hubble protobuf and gRPC stubs, one subpackage per proto package '
    '(scripts/gen_protos.py; do not edit)."""\n'
)


def proto_files(proto_root: Path) -> list[Path]:
    """Every .proto file under proto_root, relative to it, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def declares_service(path: Path) -> bool:
    """Whether a .proto file declares a gRPC service (only those get *_pb2_grpc.py modules)."""
    return re.search(r"^\s*service\s+\w+", path.read_text(encoding="utf-8"), re.MULTILINE) is not None


def well_known_include() -> Path:
    """The include folder of google/protobuf/*.proto shipped inside grpcio-tools."""
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def run_protoc(args: list[str]) -> None:
    """Run the protoc bundled with grpcio-tools; raises RuntimeError when it fails."""
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed (exit {code}): {' '.join(args)}")


def fix_imports(text: str, packages: list[str]) -> str:
    """Rewrite top-level imports of our proto packages to imports inside flowpipe._proto."""
    names = "|".join(re.escape(p) for p in packages)
    # `from flow import flow_pb2 as ...` and `from flow.flow_pb2 import *` / `import X as X`.
    pattern = re.compile(rf"^(\s*)from ({names})(\.[\w.]+)? import ", re.MULTILINE)

    def local(m: re.Match[str]) -> str:
        return f"{m.group(1)}from {IMPORT_PREFIX}.{m.group(2)}{m.group(3) or ''} import "

    return pattern.sub(local, text)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the stubs into out_dir (replacing earlier generated files); returns the files written."""
    files = proto_files(proto_root)
    if not files:
        raise RuntimeError(f"no .proto files under {proto_root}")
    packages = sorted({f.parts[0] for f in files if len(f.parts) > 1})
    includes = [f"-I{proto_root}", f"-I{well_known_include()}"]
    with tempfile.TemporaryDirectory(prefix="flowpipe-protoc-") as tmp:
        raw = Path(tmp)
        sources = [str(proto_root / f) for f in files]
        run_protoc([*includes, f"--python_out={raw}", f"--pyi_out={raw}", *sources])
        with_service = [str(proto_root / f) for f in files if declares_service(proto_root / f)]
        if with_service:
            run_protoc([*includes, f"--grpc_python_out={raw}", *with_service])

        out_dir.mkdir(parents=True, exist_ok=True)
        for old in sorted(out_dir.rglob("*")):
            if old.is_file() and old.name.endswith(GENERATED_SUFFIXES):
                old.unlink()
        written: list[Path] = []
        for src in sorted(p for p in raw.rglob("*") if p.is_file()):
            dest = out_dir / src.relative_to(raw)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(fix_imports(src.read_text(encoding="utf-8"), packages).encode("utf-8"))
            written.append(dest)
    (out_dir / "__init__.py").write_text(ROOT_INIT, encoding="utf-8")
    written.append(out_dir / "__init__.py")
    for pkg in packages:
        init = out_dir / pkg / "__init__.py"
        init.write_text(PACKAGE_INIT.format(pkg=pkg), encoding="utf-8")
        written.append(init)
    return sorted(written)


def main(argv: list[str]) -> int:
    """Command line entry: optional output directory as the only argument."""
    if len(argv) > 1:
        print("usage: gen_protos.py [OUTPUT_DIR]", file=sys.stderr)
        return 2
    out_dir = Path(argv[0]).resolve() if argv else DEFAULT_OUT
    try:
        written = generate(out_dir)
    except ModuleNotFoundError as exc:
        print(
            f"gen_protos: {exc.name} is missing; install the dev extra: pip install -e '.[dev]'",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path.relative_to(out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
