"""Writing files safely: whole or not at all, with the permissions of a normally created file.

Every file kcs-lens writes goes through :func:`atomic_write_bytes` (or the JSON / safetensors
wrappers): a temporary file beside the target, flushed and renamed into place, so a crash or a
full disk never leaves a half-written file under the real name. The temporary file gets the mode
``0666 & ~umask`` (``mkstemp`` alone would give 0600, unreadable by the group on a shared
directory). An ``OSError`` while writing becomes an :class:`~kcs_lens.errors.OutputError` naming
the file and the cause; the previous version of the file, if any, is left untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors.torch import save
from torch import Tensor

from kcs_lens.errors import KcsLensError, OutputError

TMP_SUFFIX = ".tmp"
_umask_lock = threading.Lock()


def file_mode() -> int:
    """The mode a newly created regular file gets under the current umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a newly created folder gets under the current umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new temporary folder ``parent/.NAME.XXXX`` with the mode of a normally created folder
    (``mkdtemp`` alone gives 0700): it is renamed into place once complete."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    os.chmod(tmp, dir_mode())
    return tmp


def normal_modes(root: Path) -> None:
    """Give every file and folder under ``root`` the mode of a normally created one (libraries that
    write through private temporary files, e.g. transformers' safetensors, leave 0600)."""
    fmode, dmode = file_mode(), dir_mode()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, dmode if p.is_dir() else fmode)


def output_files(out: str | os.PathLike[str], suffixes: tuple[str, ...]) -> tuple[Path, list[Path]]:
    """``--out FILE`` of a command that writes FILE.md, FILE.csv...: the base name and the files.
    A given suffix among ``suffixes`` is dropped (``rep.md`` -> ``rep``); any other dot stays part
    of the name (``results-v1.2`` -> ``results-v1.2.md``, never ``results-v1.md``)."""
    p = Path(out)
    base = p.with_name(p.name[: -len(p.suffix)]) if p.suffix in suffixes else p
    return base, [with_added_suffix(base, s) for s in suffixes]


def with_added_suffix(base: Path, suffix: str) -> Path:
    """``base`` + ``suffix`` (``Path.with_suffix`` would replace the part after a dot in the name)."""
    return base.with_name(base.name + suffix)


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, file_mode())
    return Path(tmp)


def is_temporary(path: Path) -> bool:
    """A temporary file left by an interrupted atomic write (``.NAME.XXXX.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(path)
        write(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe(path: Path, option: str) -> None:
    """OutputError unless files can be created where ``path`` (a file or folder to write) goes."""
    base = _nearest_existing(path.parent if path.name else path)
    if not base.is_dir():
        raise OutputError(f"{option} {path}: cannot create it, {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".kcs-lens-probe.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot create files in {base} ({e.strerror or e})") from None


def check_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """Fail now, naming ``option``, if ``path`` cannot be written later (call before long work)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{option} {p}: is a directory, expected a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{option} {p}: exists and is not writable")
    _probe(p, option)
    return p


def check_output_dir(path: str | os.PathLike[str], option: str, *, new: bool = False) -> Path:
    """Fail now, naming ``option``, if the folder ``path`` cannot be created or written (``new``:
    it must not exist yet)."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if new:
            raise OutputError(f"{option} {p}: exists; this command writes a new folder (remove it or choose another)")
        if not p.is_dir():
            raise OutputError(f"{option} {p}: exists and is not a directory")
        _probe(p / "x", option)
    else:
        _probe(p, option)
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write_atomically(path, write)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Indented JSON (keys in the order given); NaN and infinity are refused (not valid JSON)."""
    try:
        text = json.dumps(obj, indent=2, default=str, allow_nan=False)
    except ValueError as e:
        raise OutputError(f"cannot write {path}: {e} (a NaN or infinite number)") from e
    return atomic_write_bytes(path, (text + "\n").encode())


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose header is canonical JSON (sorted keys): the same tensors and
    metadata give the same bytes in every process (the library writes its metadata map in a
    per-process random order). Tensor offsets are relative to the data section, so rewriting the
    header leaves the data as it is."""
    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section stays 8-byte aligned
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys (for metadata values that must be byte-stable)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def json_records(path: Path, error: type[KcsLensError]) -> Iterator[tuple[str, Any]]:
    """(where, record) of a ``.jsonl`` file (one JSON value per line) or a ``.json`` file (a JSON
    array, or JSON lines saved as .json); ``where`` is ``FILE:LINE`` or ``FILE: item I``. A UTF-8
    byte-order mark and CRLF line ends are accepted (files saved on Windows). Any problem is one
    ``error`` naming the file and line: invalid JSON, a whole file that is one JSON object instead
    of a list, text that is not UTF-8, nesting too deep to parse."""
    if path.suffix.lower() == ".json":
        raw = path.read_text(encoding="utf-8-sig")
        head = raw.lstrip()
        if head.startswith(("[", "{")):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                if head.startswith("["):
                    raise error(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                data = None  # JSON lines saved as .json: read line by line below
            except RecursionError:
                raise error(f"{path}: JSON nested too deeply to read") from None
            if isinstance(data, list):
                for i, row in enumerate(data):
                    yield f"{path}: item {i}", row
                return
            if isinstance(data, dict) and len(raw.strip().splitlines()) > 1:
                raise error(
                    f"{path}: the file is one JSON object; expected a JSON list of records [{{...}}, ...] or one record per line"
                )
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise error(f"{path}:{lineno}: JSON nested too deeply to read") from None


def read_mapping(path: str | os.PathLike[str], *, what: str, error: type[KcsLensError]) -> Any:
    """Parse a JSON, TOML or YAML file (by its extension). Any problem is one ``error`` line naming
    ``what`` and the file (with line and column for a syntax error)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".toml", ".yaml", ".yml"):
        raise error(f"{what} {p}: expected a .json, .toml, .yaml or .yml file")
    if not p.exists():
        raise error(f"{what} {p}: no such file")
    if not p.is_file():
        raise error(f"{what} {p}: not a file")
    raw = read_text(p, error, what, encoding="utf-8-sig")
    try:
        if suffix == ".json":
            return json.loads(raw)
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(raw)
        import yaml

        return yaml.safe_load(raw)
    except json.JSONDecodeError as e:
        raise error(f"{what} {p}:{e.lineno}:{e.colno}: cannot parse ({e.msg})") from None
    except RecursionError:
        raise error(f"{what} {p}: nested too deeply to parse") from None
    except Exception as e:  # TOML and YAML syntax errors
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        msg = getattr(e, "problem", None) or str(e)
        raise error(f"{what} {where}: cannot parse ({' '.join(str(msg).split())})") from None


def read_text(path: Path, error: type[KcsLensError], what: str = "", encoding: str = "utf-8") -> str:
    """A UTF-8 text file, or ``error`` naming it (``what``: the option it came from; ``utf-8-sig``:
    a byte-order mark is dropped)."""
    where = f"{what} {path}" if what else str(path)
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror or e})") from None
