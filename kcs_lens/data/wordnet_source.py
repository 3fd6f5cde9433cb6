"""Opening WordNet: NLTK's data (``nltk.download("wordnet")``) when it is installed, else the
Debian/Ubuntu package ``wordnet-base`` in ``/usr/share/wordnet``. The Debian layout lacks the
``lexnames`` file that NLTK's reader requires and its ``get_version()`` ("3.0") differs from NLTK's
default, which makes the reader try to load a second WordNet to map synsets. We work around both
(see ``_prepare_local_dir`` and ``_LocalWordNetReader``) without writing to the WordNet directory
itself. The IsA knowledge graphs built from it are :mod:`kcs_lens.data.wordnet`."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from kcs_lens.errors import WordNetError

DEBIAN_WORDNET_DIR = "/usr/share/wordnet"

_HOW_TO_GET = (
    "Install WordNet with `python -c \"import nltk; nltk.download('wordnet')\"` "
    "or, on Debian/Ubuntu, `apt-get install wordnet-base` (files in /usr/share/wordnet)."
)

# The 45 standard WordNet lexicographer files (WordNet 3.0 `lexnames`), in index order.
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
_SYNTACTIC_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_REQUIRED_FILES = ("data.noun", "index.noun")


# --------------------------------------------------------------------------------------------
# Opening WordNet
# --------------------------------------------------------------------------------------------


def _lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def _cache_root() -> Path:
    base = os.environ.get("KCS_LENS_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "kcs_lens" if base else Path.home() / ".cache" / "kcs_lens"


def _prepare_local_dir(src: Path) -> Path:
    """Return a directory NLTK's reader can open for the WordNet database in ``src``.

    If ``src`` already has ``lexnames`` (NLTK layout) it is used as is. Otherwise we build a
    copy in a cache directory we own (``$KCS_LENS_CACHE`` or ``$XDG_CACHE_HOME`` or ``~/.cache``,
    then ``kcs_lens/wordnet/<hash of src>``; the temp dir if those are not writable): each file
    of ``src`` copied (~28 MB, once; refreshed when the source changes) plus a written
    ``lexnames``. Links do not work: NLTK >= 3.10 refuses corpus files reached through a symlink
    that leaves the corpus root and multiply-linked (hard-linked) files. ``src`` itself (e.g.
    /usr/share/wordnet) is never written to.
    """
    if (src / "lexnames").is_file():
        return src
    key = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12]
    candidates = [
        _cache_root() / "wordnet" / key,
        Path(tempfile.gettempdir()) / f"kcs_lens_wordnet_{os.getuid()}_{key}",
    ]
    last_error: Exception | None = None
    for farm in candidates:
        try:
            farm.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.iterdir()):
                if not f.is_file() or f.name == "lexnames":
                    continue
                dst = farm / f.name
                st = f.stat()
                if dst.is_file() and not dst.is_symlink():
                    dt = dst.stat()
                    if dt.st_size == st.st_size and dt.st_mtime >= st.st_mtime:
                        continue
                tmp = farm / f".{f.name}.{os.getpid()}.tmp"
                shutil.copy2(f, tmp)
                os.chmod(tmp, 0o644)  # NLTK refuses group/world-writable corpus files
                os.replace(tmp, dst)  # atomic: a concurrent reader never sees a partial file
            lex = farm / "lexnames"
            if not lex.is_file() or lex.read_text() != _lexnames_text():
                tmp = farm / f".lexnames.{os.getpid()}.tmp"
                tmp.write_text(_lexnames_text())
                os.replace(tmp, lex)
            return farm
        except OSError as e:  # read-only home, full disk, ...: try the next location
            last_error = e
    raise WordNetError(f"cannot prepare a readable copy of the WordNet directory {src}: {last_error}")


def _local_reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _LocalWordNetReader(WordNetCorpusReader):
        """NLTK reader for a plain WordNet 3.0 directory.

        ``map_wn`` would load NLTK's own "wordnet" corpus to map synset ids between versions
        (only needed by the Open Multilingual WordNet functions); the local copy *is* the
        version we use, so no mapping is needed.
        """

        def map_wn(self, version: str = "wordnet"):  # noqa: D401 - NLTK API
            return None

    return _LocalWordNetReader


def _open_dir(path: str | os.PathLike) -> Any:
    src = Path(path).expanduser()
    if not src.is_dir():
        raise WordNetError(f"WordNet directory {str(src)!r} does not exist. {_HOW_TO_GET}")
    missing = [f for f in _REQUIRED_FILES if not (src / f).is_file()]
    if missing:
        raise WordNetError(f"{str(src)!r} is not a WordNet database directory (missing {', '.join(missing)}). {_HOW_TO_GET}")
    root = _prepare_local_dir(src)
    import nltk

    # NLTK >= 3.9 only opens corpus files under a directory listed in nltk.data.path.
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():  # "multilingual functions are not available": expected, no OMW
        warnings.simplefilter("ignore", UserWarning)
        return _local_reader_class()(str(root), None)


def open_wordnet(path: str | os.PathLike | None = None):
    """Open WordNet and return an NLTK ``WordNetCorpusReader``.

    ``path`` None: NLTK's installed corpus (``nltk.download("wordnet")``) if present, else the
    Debian ``wordnet-base`` files in /usr/share/wordnet. ``path`` given: that directory (Debian
    layout or NLTK layout). Raises ``WordNetError`` (a ``ValueError``) saying how to get WordNet
    when nothing usable is found.
    """
    if path is not None:
        return _open_dir(path)
    try:
        import nltk

        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    if Path(DEBIAN_WORDNET_DIR).is_dir():
        return _open_dir(DEBIAN_WORDNET_DIR)
    raise WordNetError(
        f"WordNet not found: no NLTK 'wordnet' corpus (searched nltk.data.path) and no {DEBIAN_WORDNET_DIR}. " + _HOW_TO_GET
    )


def wordnet_version(wn) -> str:
    try:
        return str(wn.get_version())
    except Exception:  # pragma: no cover - defensive
        return "unknown"
