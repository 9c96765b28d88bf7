"""The QEMU test guest: a Debian kernel plus an initramfs holding busybox, python3 and vmha-guest.

`build_guest_image()` builds it once per set of inputs and caches it under
`${VMHA_CACHE:-$HOME/.cache/vmha}/guest/<key>/`; the key hashes everything that goes in (kernel,
busybox, the interpreter, the pinned dependencies, the sources of protocol/ and guest/, the init
files and this builder), so a rebuild happens only when one of them changes. Concurrent builders
serialise on a lock file and publish with an atomic rename.

Per-VM settings (the guest daemon's config, the hostname) never touch the cached image: a tiny
cpio archive is appended to it (`GuestImage.initrd_with`), as Linux unpacks concatenated archives.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# Kernel modules for virtio-serial over PCI (and an entropy source); dependencies are resolved.
GUEST_MODULES = ("virtio_pci", "virtio_console", "virtio_rng")
# Directories the guest's dynamic loader searches without an ld.so.cache.
SYSTEM_LIBRARY_DIRS = frozenset(
    {"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib", "/lib64"}
)
# Parts of the standard library the guest never imports (names anywhere in the tree).
STDLIB_EXCLUDED_ANYWHERE = frozenset({"__pycache__", "test", "tests", "idle_test"})
STDLIB_EXCLUDED_TOP = frozenset(
    {
        "site-packages",
        "dist-packages",
        "idlelib",
        "tkinter",
        "turtle.py",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "sqlite3",
        "curses",
        "venv",
        "lib-dynload",  # copied separately, filtered by EXTENSIONS_EXCLUDED
    }
)
EXTENSIONS_EXCLUDED = (
    "_test",
    "_xxtest",
    "xxlimited",
    "_ctypes_test",
    "_tkinter",
    "_curses",
    "readline",
    "nis",
    "spwd",
    "ossaudiodev",
    "_sqlite3",
    "_dbm",
    "_gdbm",
    "_xxsubinterpreters",
)
SOURCE_DISTRIBUTIONS = ("protocol", "guest")
SOURCE_SKIPPED = frozenset(
    {"__pycache__", "build", "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
GUEST_FILES = ("init", "inittab", "vmha-guest.initd", "vmha-testctl")
SKELETON = (
    *("bin", "sbin", "usr/bin", "usr/sbin", "usr/lib", "lib", "lib64", "mnt", "root"),
    *("etc/init.d", "etc/vmha", "etc/default", "proc", "sys", "dev", "run", "tmp", "var/log"),
)
MANIFEST = "image.json"
LAST_USED = "last-used"
UNUSED_DAYS = 3
INITRD = "initrd.img"
KERNEL = "vmlinuz"
BUSYBOX = Path("/bin/busybox")


class GuestImageError(RuntimeError):
    """The guest image cannot be built on this machine (a missing input or a failed step)."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot `kernel` with `initrd` (or with `initrd_with(...)` per VM)."""

    directory: Path
    key: str
    kernel_version: str
    python_version: str

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def initrd_bytes(self) -> int:
        return self.initrd.stat().st_size

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = json.loads((directory / MANIFEST).read_text())
        return cls(
            directory=directory,
            key=manifest["key"],
            kernel_version=manifest["kernel_version"],
            python_version=manifest["python_version"],
        )

    def initrd_with(self, files: Mapping[str, str | bytes], dest: Path) -> Path:
        """Write the cached initramfs followed by an archive of `files` (guest path → content)."""
        with dest.open("wb") as out:
            with self.initrd.open("rb") as base:
                shutil.copyfileobj(base, out, 1 << 20)
            # Each archive of a concatenation starts on a 4-byte boundary.
            out.write(b"\0" * (-out.tell() % 4))
            write_overlay(out, files)
        return dest


def cache_root() -> Path:
    base = os.environ.get("VMHA_CACHE") or str(Path.home() / ".cache" / "vmha")
    return Path(base) / "guest"


def source_root() -> Path:
    """The repository holding protocol/ and guest/ (this file lives in testbed/src/...)."""
    configured = os.environ.get("VMHA_SOURCE_ROOT")
    if configured:
        return Path(configured)
    for parent in Path(__file__).resolve().parents:
        if all((parent / name / "pyproject.toml").is_file() for name in SOURCE_DISTRIBUTIONS):
            return parent
    raise GuestImageError("cannot find the vmha repository; set VMHA_SOURCE_ROOT")


def build_guest_image(
    *,
    repository: Path | None = None,
    cache_dir: Path | None = None,
    kernel_version: str | None = None,
) -> GuestImage:
    """Return the cached guest image for the current inputs, building it if needed."""
    inputs = GuestInputs.collect(repository or source_root(), kernel_version)
    root = cache_dir or cache_root()
    final = root / inputs.key
    if not (final / MANIFEST).is_file():
        _build_exclusively(inputs, root)
    (final / LAST_USED).touch()
    return GuestImage.load(final)


def _build_exclusively(inputs: GuestInputs, root: Path) -> None:
    """Build into a staging directory and rename it into place, one builder at a time."""
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{inputs.key}.lock"):
        if (root / inputs.key / MANIFEST).is_file():
            return  # another process built it while we waited for the lock
        staging = Path(tempfile.mkdtemp(prefix=f".build-{inputs.key}-", dir=root))
        try:
            started = time.monotonic()
            _build(inputs, staging)
            staging.rename(root / inputs.key)
            log.info("guest image %s built in %.0f s", inputs.key, time.monotonic() - started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _prune(root, keep=inputs.key)


def _prune(root: Path, keep: str) -> None:
    """Remove images nobody has used for UNUSED_DAYS (each guest change makes a new one)."""
    horizon = time.time() - UNUSED_DAYS * 86400
    for image in root.iterdir():
        marker = image / LAST_USED
        if image.name != keep and marker.is_file() and marker.stat().st_mtime < horizon:
            log.info("guest image cache: removing unused %s", image.name)
            # Its empty lock file stays: deleting a lock file can split a waiting builder's lock.
            shutil.rmtree(image, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    modules: tuple[Path, ...]  # in load order

    @classmethod
    def find(cls, version: str | None) -> Kernel:
        version = version or _newest_kernel_version()
        image = Path(f"/boot/vmlinuz-{version}")
        if not image.is_file():
            raise GuestImageError(f"{image} is missing: install a linux-image-*-amd64 package")
        return cls(version, image, tuple(_module_load_order(version, GUEST_MODULES)))


def _newest_kernel_version() -> str:
    versions = [
        path.name.removeprefix("vmlinuz-")
        for path in Path("/boot").glob("vmlinuz-*-amd64")
        if Path("/lib/modules", path.name.removeprefix("vmlinuz-"), "modules.dep").is_file()
    ]
    if not versions:
        raise GuestImageError("no /boot/vmlinuz-*-amd64 with modules: install linux-image-amd64")
    return max(versions, key=_natural_key)


def _natural_key(text: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (0, part) for part in re.split(r"(\d+)", text)]


def _module_load_order(version: str, names: Iterable[str]) -> list[Path]:
    """The .ko files for `names` and their dependencies, each once, dependencies first."""
    ordered: list[Path] = []
    for name in names:
        result = _run(["modprobe", "-S", version, "--show-depends", name])
        for line in result.splitlines():
            # "insmod /lib/modules/.../x.ko [options]", or "builtin x" for built-in drivers.
            if line.startswith("insmod "):
                path = Path(line.split()[1])
                if path not in ordered:
                    ordered.append(path)
    return ordered


@dataclass(frozen=True)
class Python:
    """The interpreter running this code: it goes into the guest, stdlib pruned."""

    version: str  # "3.11"
    executable: Path
    stdlib: Path
    extensions: Path

    @classmethod
    def current(cls) -> Python:
        executable = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
        stdlib = Path(os.__file__).parent
        extensions = Path(sysconfig.get_config_var("DESTSHARED") or stdlib / "lib-dynload")
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return cls(version, executable, stdlib, extensions)

    @property
    def guest_executable(self) -> str:
        return f"/usr/bin/python{self.version}"

    @property
    def guest_stdlib(self) -> str:
        return f"/usr/lib/python{self.version}"

    @property
    def guest_site_packages(self) -> str:
        # Where this interpreter's `site` looks with prefix /usr (scheme differs per distro).
        return site.getsitepackages(["/usr"])[0]


@dataclass(frozen=True)
class GuestInputs:
    """Everything that goes into the image; `key` hashes all of it."""

    repository: Path
    kernel: Kernel
    python: Python
    constraints: str  # pinned third-party dependencies of vmha-guest
    key: str

    @classmethod
    def collect(cls, repository: Path, kernel_version: str | None) -> GuestInputs:
        kernel = Kernel.find(kernel_version)
        python = Python.current()
        constraints = _dependency_pins(repository)
        digest = hashlib.sha256()
        for label, content in _key_material(repository, kernel, python, constraints):
            digest.update(label.encode() + b"\0" + hashlib.sha256(content).digest())
        return cls(repository, kernel, python, constraints, digest.hexdigest()[:16])


def _key_material(
    repository: Path, kernel: Kernel, python: Python, constraints: str
) -> Iterator[tuple[str, bytes]]:
    yield "builder", Path(__file__).read_bytes()
    yield "kernel", kernel.version.encode() + kernel.image.read_bytes()
    for module in kernel.modules:
        yield str(module), module.read_bytes()
    yield "busybox", BUSYBOX.read_bytes()
    yield "python", f"{sys.version}|{python.executable}|{python.stdlib}".encode()
    for library in _shared_libraries(python.executable).values():
        info = library.stat() if library else None
        if info is None:
            raise GuestImageError(f"a shared library of {python.executable} is missing")
        yield str(library), f"{info.st_size}|{info.st_mtime_ns}".encode()
    yield "constraints", constraints.encode()
    for name in GUEST_FILES:
        yield f"guest_files/{name}", _guest_file(name)
    for path in _source_files(repository):
        yield str(path.relative_to(repository)), path.read_bytes()


def _guest_file(name: str) -> bytes:
    return (
        importlib.resources.files("vmha_testbed")
        .joinpath("guest_files")
        .joinpath(name)
        .read_bytes()
    )


def _source_files(repository: Path) -> list[Path]:
    found: list[Path] = []
    for distribution in SOURCE_DISTRIBUTIONS:
        for directory, dirnames, filenames in os.walk(repository / distribution):
            dirnames[:] = sorted(
                d for d in dirnames if d not in SOURCE_SKIPPED and not d.endswith(".egg-info")
            )
            found.extend(Path(directory, f) for f in sorted(filenames) if not f.endswith(".pyc"))
    return found


def _dependency_pins(repository: Path) -> str:
    """`name==version` for the third-party closure of vmha-guest, as installed here.

    The guest then runs the very versions the tests run on the host; a dependency not
    installed here stays unpinned.
    """
    pending = [
        requirement
        for distribution in SOURCE_DISTRIBUTIONS
        for requirement in _declared_requirements(repository / distribution / "pyproject.toml")
    ]
    local = {_requirement_name(r) for r in pending if _requirement_name(r).startswith("vmha-")}
    pins: dict[str, str] = {}
    while pending:
        name = _requirement_name(pending.pop())
        if name in pins or name in local:
            continue
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pins[name] = ""
            continue
        pending.extend(r for r in importlib.metadata.requires(name) or [] if "extra ==" not in r)
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()) if version)


def _declared_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project.get("dependencies", []))


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise GuestImageError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


# --------------------------------------------------------------------------- build


def _build(inputs: GuestInputs, out: Path) -> None:
    stage = out / "rootfs"
    _make_skeleton(stage)
    _install_busybox(stage)
    _install_modules(stage, inputs.kernel)
    _install_python(stage, inputs.python)
    _install_vmha_guest(stage, inputs)
    _install_guest_files(stage, inputs.python)
    _precompile(stage, inputs.python)
    shutil.copyfile(inputs.kernel.image, out / KERNEL)
    with (out / INITRD).open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        archive = CpioWriter(gz)
        archive.add_device("dev/console", stat.S_IFCHR | 0o600, 5, 1)
        archive.add_device("dev/null", stat.S_IFCHR | 0o666, 1, 3)
        archive.add_tree(stage)
        archive.finish()
    shutil.rmtree(stage)
    unpacked_bytes = archive.size
    manifest = {
        "key": inputs.key,
        "kernel_version": inputs.kernel.version,
        "python_version": inputs.python.version,
        "python": str(inputs.python.executable),
        "modules": [str(m) for m in inputs.kernel.modules],
        "constraints": inputs.constraints.split(),
        "initrd_bytes": (out / INITRD).stat().st_size,
        "unpacked_bytes": unpacked_bytes,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _make_skeleton(stage: Path) -> None:
    for directory in SKELETON:
        (stage / directory).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    etc = stage / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
    (etc / "hostname").write_text("vmha-guest\n")


def _install_busybox(stage: Path) -> None:
    if not BUSYBOX.is_file():
        raise GuestImageError(f"{BUSYBOX} is missing: install busybox-static")
    shutil.copyfile(BUSYBOX, stage / "bin/busybox")
    (stage / "bin/busybox").chmod(0o755)
    if not _install_libraries(stage, BUSYBOX):  # nothing to do for busybox-static
        raise GuestImageError(f"a shared library of {BUSYBOX} is missing")
    for applet in _run([str(BUSYBOX), "--list-full"]).split():
        link = stage / applet
        if applet != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")


def _install_modules(stage: Path, kernel: Kernel) -> None:
    for module in kernel.modules:
        _copy_file(module, stage, str(module))
    listing = "".join(f"{module}\n" for module in kernel.modules)
    (stage / "etc/vmha/modules").write_text(listing)


def _install_python(stage: Path, python: Python) -> None:
    _copy_file(python.executable, stage, python.guest_executable)
    _strip(stage / python.guest_executable.lstrip("/"))
    _install_libraries(stage, python.executable)
    for alias in ("python3", "python"):
        (stage / "usr/bin" / alias).symlink_to(f"python{python.version}")
    guest_stdlib = stage / python.guest_stdlib.lstrip("/")
    shutil.copytree(python.stdlib, guest_stdlib, symlinks=True, ignore=_stdlib_ignore)
    dynload = guest_stdlib / "lib-dynload"
    dynload.mkdir(exist_ok=True)
    for extension in sorted(python.extensions.glob("*.so")):
        if extension.name.split(".")[0].startswith(EXTENSIONS_EXCLUDED):
            continue
        if _install_libraries(stage, extension):
            shutil.copyfile(extension, dynload / extension.name)
            _strip(dynload / extension.name)
        else:
            log.info("guest image: skipped %s (a library it needs is missing)", extension.name)


def _strip(path: Path) -> None:
    """Drop debugging symbols (a pyenv libpython carries ~17 MB of them); optional."""
    strip = shutil.which("strip")
    if strip and subprocess.run([strip, "--strip-unneeded", str(path)], check=False).returncode:
        log.info("guest image: could not strip %s", path)


def _stdlib_ignore(directory: str, names: list[str]) -> set[str]:
    ignored = {name for name in names if name in STDLIB_EXCLUDED_ANYWHERE}
    if Path(directory) == Path(os.__file__).parent:
        ignored |= {n for n in names if n in STDLIB_EXCLUDED_TOP or n.startswith("config-")}
    return ignored


def _install_libraries(stage: Path, binary: Path) -> bool:
    """Copy the shared libraries `binary` needs; False if one of them is not on this machine."""
    libraries = _shared_libraries(binary)
    if None in libraries.values():
        return False
    for name, path in libraries.items():
        assert path is not None
        guest_dir = str(Path(name).parent) if name.startswith("/") else str(path.parent)
        if guest_dir not in SYSTEM_LIBRARY_DIRS:
            guest_dir = "/usr/lib"  # e.g. a libpython found through the binary's RUNPATH
        target = stage / guest_dir.lstrip("/") / Path(name).name
        if not target.exists():
            _copy_file(path, stage, str(target.relative_to(stage)))
            _strip(target)
    return True


def _shared_libraries(binary: Path) -> dict[str, Path | None]:
    """`ldd` of `binary`: soname (or the loader's absolute path) → file, None if not found."""
    found: dict[str, Path | None] = {}
    result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in result.stdout + result.stderr:
        return found  # static, like busybox-static
    if result.returncode != 0:
        raise GuestImageError(f"ldd {binary} failed: {result.stderr.strip()}")
    for line in map(str.strip, result.stdout.splitlines()):
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.split("(")[0].strip()
            found[name.strip()] = None if target in ("", "not found") else Path(target)
        elif line.startswith("/"):  # the dynamic loader, needed at exactly this path
            loader = line.split()[0]
            found[loader] = Path(loader)
    return found


def _install_vmha_guest(stage: Path, inputs: GuestInputs) -> None:
    """pip-install protocol/ and guest/ with their pinned dependencies into site-packages."""
    target = stage / inputs.python.guest_site_packages.lstrip("/")
    with tempfile.TemporaryDirectory(prefix="vmha-guest-src-") as scratch:
        sources = []
        for distribution in SOURCE_DISTRIBUTIONS:
            # A copy, so the build leaves no build/ or egg-info in the working tree.
            copy = Path(scratch, distribution)
            shutil.copytree(inputs.repository / distribution, copy, ignore=_source_ignore)
            sources.append(str(copy))
        constraints = Path(scratch, "constraints.txt")
        constraints.write_text(inputs.constraints)
        _run(
            [
                *(sys.executable, "-m", "pip", "install", "--quiet", "--no-input"),
                *("--disable-pip-version-check", "--no-compile", "--prefer-binary"),
                *("--target", str(target), "--constraint", str(constraints), *sources),
            ]
        )
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts with host shebangs
    for extension in sorted(target.rglob("*.so")):  # e.g. pydantic-core needs libgcc_s
        if not _install_libraries(stage, extension):
            raise GuestImageError(f"a shared library that {extension.name} needs is missing")


def _source_ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in SOURCE_SKIPPED or n.endswith((".egg-info", ".pyc"))}


def _install_guest_files(stage: Path, python: Python) -> None:
    placements = {
        "init": ("init", 0o755),
        "inittab": ("etc/inittab", 0o644),
        "vmha-guest.initd": ("etc/init.d/vmha-guest", 0o755),
        "vmha-testctl": ("usr/sbin/vmha-testctl", 0o755),
    }
    for name, (guest_path, mode) in placements.items():
        (stage / guest_path).write_bytes(_guest_file(name))
        (stage / guest_path).chmod(mode)
    wrapper = stage / "usr/bin/vmha-guest"
    wrapper.write_text(f'#!/bin/sh\nexec {python.guest_executable} -m vmha_guest "$@"\n')
    wrapper.chmod(0o755)


def _precompile(stage: Path, python: Python) -> None:
    """Byte-compile everything: Python start-up under TCG is slow enough without compiling.

    unchecked-hash .pyc files are used as they are, whatever the files' timestamps.
    """
    directories = [python.guest_stdlib, python.guest_site_packages]
    _run(
        [sys.executable, "-m", "compileall", "-q", "-j", "2"]
        + ["--invalidation-mode", "unchecked-hash", "-s", str(stage), "-p", "/"]
        + [str(stage / d.lstrip("/")) for d in directories]
    )


def _copy_file(source: Path, stage: Path, guest_path: str) -> None:
    target = stage / guest_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)  # follows symlinks: the guest gets the file itself
    target.chmod(source.stat().st_mode & 0o777)


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuestImageError(
            f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return result.stdout


# --------------------------------------------------------------------------- cpio


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks as initramfs.

    Owners are root and timestamps fixed, so the same tree always gives the same archive.
    """

    MTIME = 1_700_000_000

    def __init__(self, out: Sink) -> None:
        self._out = out
        self._inode = 0
        self._written = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._inode,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            self.MTIME,
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._write(header + encoded)
        self._pad()
        self._write(data)
        self._pad()

    def add_device(self, name: str, mode: int, major: int, minor: int) -> None:
        self.add(name, mode, rdev=(major, minor))

    def add_file(self, name: str, content: bytes, mode: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | mode, content)

    def add_directory(self, name: str, mode: int = 0o755) -> None:
        self.add(name, stat.S_IFDIR | mode)

    def add_tree(self, root: Path) -> None:
        """Add everything under `root` (parents before children), named relative to it."""
        for path in _walk(root):
            info = path.lstat()
            name = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                self.add(name, info.st_mode, os.readlink(path).encode())
            elif stat.S_ISREG(info.st_mode):
                self.add(name, info.st_mode, path.read_bytes())
            elif stat.S_ISDIR(info.st_mode):
                self.add(name, info.st_mode)

    @property
    def size(self) -> int:
        """Bytes written so far (uncompressed)."""
        return self._written

    def finish(self) -> None:
        self.add("TRAILER!!!", 0)
        self._write(b"\0" * (-self._written % 512))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (-self._written % 4))


def _walk(root: Path) -> Iterator[Path]:
    for entry in sorted(root.iterdir()):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)


def write_overlay(out: Sink, files: Mapping[str, str | bytes]) -> None:
    """An uncompressed archive of `files` (guest path → content) and their parent directories."""
    archive = CpioWriter(out)
    directories: set[str] = set()
    for guest_path in sorted(files):
        parts = Path(guest_path.lstrip("/")).parts
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in directories:
                directories.add(parent)
                archive.add_directory(parent)
    for guest_path, content in sorted(files.items()):
        data = content.encode() if isinstance(content, str) else content
        archive.add_file(guest_path.lstrip("/"), data)
    archive.finish()
