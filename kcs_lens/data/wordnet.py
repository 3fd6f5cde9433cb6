"""WordNet IsA knowledge graphs: TargetKGs (connected neighbourhoods of a root synset) and ControlKGs.

Triplets come back as dicts in the project's canonical JSONL format::

    {"head": "cathedral", "relation": "IsA", "tail": "building",
     "text": "A cathedral is a building",
     "head_synset": "cathedral.n.01", "tail_synset": "building.n.01"}

An entity is rendered by its synset's first lemma with ``_`` replaced by a space. Tails are always
single words (letters only: no ``_``, space, hyphen, digit or apostrophe), as in the paper's data,
so that every tail is one word after the prefix. ``text`` is the canonical IsA template
(``ISA_TEMPLATES[0]``: "A cathedral is a building").

Getting WordNet: ``open_wordnet()`` uses NLTK's data (``nltk.download("wordnet")``) when it is
installed, else the Debian/Ubuntu package ``wordnet-base`` in ``/usr/share/wordnet``. The Debian
layout lacks the ``lexnames`` file that NLTK's reader requires and its ``get_version()`` ("3.0")
differs from NLTK's default, which makes the reader try to load a second WordNet to map synsets.
We work around both (see ``_prepare_local_dir`` and ``_LocalWordNetReader``) without writing to
the WordNet directory itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from kcs_lens.data.templates import ISA_TEMPLATES, fill
from kcs_lens.errors import WordNetError

__all__ = [
    "WordNetError",
    "DEBIAN_WORDNET_DIR",
    "open_wordnet",
    "wordnet_version",
    "entity_name",
    "is_single_word",
    "make_isa_triplet",
    "target_neighbourhood",
    "build_target_kg",
    "build_control_kg",
    "kg_synsets",
]

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


# --------------------------------------------------------------------------------------------
# Triplets
# --------------------------------------------------------------------------------------------

_SINGLE_WORD = re.compile(r"^[A-Za-z]+$")


def entity_name(synset) -> str:
    """The synset's first lemma, '_' -> ' ' (e.g. 'guild_hall' -> 'guild hall')."""
    return synset.lemmas()[0].name().replace("_", " ")


def is_single_word(name: str) -> bool:
    """True for one word of letters (no '_', space, hyphen, digit, apostrophe or dot)."""
    return bool(_SINGLE_WORD.match(name))


def make_isa_triplet(head_synset, tail_synset, template: int = 0) -> dict:
    head, tail = entity_name(head_synset), entity_name(tail_synset)
    return {
        "head": head,
        "relation": "IsA",
        "tail": tail,
        "text": fill(ISA_TEMPLATES[template], head, tail),
        "head_synset": head_synset.name(),
        "tail_synset": tail_synset.name(),
    }


def _get_synset(wn, name: str):
    try:
        return wn.synset(name)
    except Exception as e:  # nltk raises WordNetError (plain Exception) or ValueError
        raise WordNetError(f"unknown WordNet synset {name!r}: {e}") from None


def _parents(s) -> list:
    return list(s.hypernyms()) + list(s.instance_hypernyms())


def target_neighbourhood(wn, root: str, *, up: int = 1, down: int = 2) -> list[tuple[int, Any, Any]]:
    """All IsA edges (level, head synset, tail synset) around ``root`` before any sampling.

    Levels: -k for hypernym edges k steps above the root (``root -> parent`` is -1), +k for
    hyponym edges k steps below (``child -> root`` is +1). Tails are single words; an upward
    chain stops at a multi-word hypernym, and a multi-word hyponym is a head but never a tail.
    """
    rs = _get_synset(wn, root)
    edges: list[tuple[int, Any, Any]] = []
    frontier = [rs]
    for level in range(1, up + 1):
        nxt = []
        for node in frontier:
            for par in sorted(node.hypernyms(), key=lambda s: s.name()):
                if is_single_word(entity_name(par)):
                    edges.append((-level, node, par))
                    nxt.append(par)
        frontier = nxt
    frontier = [rs] if is_single_word(entity_name(rs)) else []
    for level in range(1, down + 1):
        nxt = []
        for par in frontier:
            for child in sorted(par.hyponyms(), key=lambda s: s.name()):
                edges.append((level, child, par))
                if is_single_word(entity_name(child)):
                    nxt.append(child)
        frontier = nxt
    return edges


def build_target_kg(
    wn,
    root: str,
    *,
    up: int = 1,
    down: int = 2,
    max_triplets: int = 40,
    min_triplets: int = 10,
    seed: int = 0,
    exclude_synsets: Iterable[str] = (),
    exclude_heads: Iterable[str] = (),
    single_parent: bool = False,
    head_filter: Callable[[str], bool] | None = None,
) -> list[dict]:
    """A TargetKG: a connected IsA neighbourhood of ``root`` with ``min_triplets..max_triplets`` triplets.

    Hypernym edges up to ``up`` levels above the root are always kept. Hyponym edges are added
    breadth-first down to ``down`` levels; when a level has more candidate edges than the budget
    left, a seeded sample is drawn (half the remaining budget at a level that is not the last, so
    deeper levels get a share), and any budget left at the end is filled from the edges not drawn.
    An edge is only added below a node that is already in the graph, so the result is connected.

    Each head appears once. ``exclude_synsets`` / ``exclude_heads`` keep synsets / head names out
    (e.g. to make several TargetKGs pairwise disjoint); ``single_parent`` keeps only heads with
    exactly one hypernym (so "A <head> is a" has one right answer); ``head_filter(name)`` False
    keeps a hyponym out (the root and its hypernyms are always kept). Deterministic for ``seed``.
    Raises ``WordNetError`` (ValueError) for an unknown root, ValueError when fewer than
    ``min_triplets`` triplets can be built.
    """
    if min_triplets > max_triplets:  # else "only N triplets" would report the cap, not what exists
        raise WordNetError(f"min_triplets ({min_triplets}) is larger than max_triplets ({max_triplets})")
    rs = _get_synset(wn, root)
    excl = set(exclude_synsets)
    excl_heads = set(exclude_heads)
    if root in excl:
        raise WordNetError(f"root synset {root!r} is excluded")
    rng = random.Random(f"target:{root}:{seed}")
    in_graph = {rs.name()}
    heads_used: set[str] = set()
    chosen: list[tuple[int, Any, Any]] = []

    def ok(child, par) -> bool:
        h, t = entity_name(child), entity_name(par)
        return (
            child.name() not in in_graph
            and child.name() not in excl
            and par.name() not in excl
            and h not in heads_used
            and h not in excl_heads
            and h.lower() != t.lower()
            and is_single_word(t)
            and (not single_parent or len(_parents(child)) == 1)
            and (head_filter is None or bool(head_filter(h)))
        )

    def take(edge) -> None:
        chosen.append(edge)
        in_graph.add(edge[1].name())
        heads_used.add(entity_name(edge[1]))

    # Upward: the root's hypernym chain (a hypernym is a head above the root, the root a tail).
    frontier = [rs]
    for level in range(1, up + 1):
        nxt = []
        for node in frontier:
            for par in sorted(node.hypernyms(), key=lambda s: s.name()):
                if par.name() in in_graph or par.name() in excl or not is_single_word(entity_name(par)):
                    continue
                h = entity_name(node)
                if h in heads_used or h in excl_heads or (single_parent and len(_parents(node)) != 1):
                    continue
                chosen.append((-level, node, par))
                heads_used.add(h)
                in_graph.add(par.name())
                nxt.append(par)
        frontier = nxt

    # Downward, breadth-first, sampled when a level has too many edges.
    leftovers: list[tuple[int, Any, Any]] = []
    frontier = [rs] if is_single_word(entity_name(rs)) else []
    for level in range(1, down + 1):
        remaining = max_triplets - len(chosen)
        if remaining <= 0 or not frontier:
            break
        cands, seen = [], set()
        for par in frontier:
            for child in sorted(par.hyponyms(), key=lambda s: s.name()):
                if child.name() not in seen and ok(child, par):
                    seen.add(child.name())
                    cands.append((level, child, par))
        if len(cands) > remaining:
            quota = remaining if level == down else max(1, (remaining + 1) // 2)
            picked_idx = set(rng.sample(range(len(cands)), quota))
        else:
            picked_idx = set(range(len(cands)))
        nxt = []
        for i, e in enumerate(cands):
            if i in picked_idx and ok(e[1], e[2]):
                take(e)
                if is_single_word(entity_name(e[1])):
                    nxt.append(e[1])
            elif i not in picked_idx:
                leftovers.append(e)
        frontier = nxt
    # Fill the budget with edges that were not drawn (their parent is in the graph: connected).
    rng.shuffle(leftovers)
    for e in leftovers:
        if len(chosen) >= max_triplets:
            break
        if e[2].name() in in_graph and ok(e[1], e[2]):
            take(e)

    if len(chosen) < min_triplets:
        raise WordNetError(
            f"only {len(chosen)} IsA triplets with single-word tails around {root!r} "
            f"(up={up}, down={down}); need at least {min_triplets}"
        )
    chosen.sort(key=lambda e: (e[0] > 0, abs(e[0]), e[1].name()))
    return [make_isa_triplet(child, par) for _, child, par in chosen]


def kg_synsets(triplets: Iterable[dict]) -> set[str]:
    """All head and tail synset names of a list of triplets."""
    out: set[str] = set()
    for t in triplets:
        out.add(t["head_synset"])
        out.add(t["tail_synset"])
    return out


def build_control_kg(
    wn,
    exclude_synsets: set[str],
    n: int,
    seed: int,
    *,
    exclude_names: bool = True,
    single_parent: bool = True,
    min_tail_heads: int = 1,
    exclude_heads: Iterable[str] = (),
    head_filter: Callable[[str], bool] | None = None,
) -> list[dict]:
    """A ControlKG: ``n`` IsA triplets over noun synsets sharing no synset with ``exclude_synsets``.

    Candidates: every noun synset (head) with a hypernym (tail) whose name is a single word,
    neither in ``exclude_synsets``. With ``exclude_names`` a candidate is also dropped when its
    head or tail *name* equals the name of an excluded synset (so no control sentence mentions a
    TargetKG entity, even through a homonymous synset). Head names naming several candidate
    synsets are ambiguous and dropped; with ``single_parent`` only heads with exactly one
    hypernym are kept, so each head has one right tail. ``min_tail_heads`` drops rare tails
    (tails with fewer candidate heads); ``head_filter(name)`` False drops a head name (e.g. to keep
    lower-case common nouns only). ``exclude_heads`` are head names to leave out. Returns a seeded sample in shuffled order; raises
    ValueError when fewer than ``n`` candidates exist.
    """
    excl = set(exclude_synsets)
    excl_names: set[str] = set()
    if exclude_names:
        for name in excl:
            try:
                excl_names.add(entity_name(wn.synset(name)).lower())
            except Exception:
                pass
    excl_names |= {h.lower() for h in exclude_heads}
    cands = []
    for s in wn.all_synsets("n"):
        if s.name() in excl:
            continue
        parents = _parents(s)
        if single_parent and len(parents) != 1:
            continue
        h = entity_name(s)
        if h.lower() in excl_names or (head_filter is not None and not head_filter(h)):
            continue
        for p in s.hypernyms():
            t = entity_name(p)
            if p.name() in excl or not is_single_word(t) or t.lower() in excl_names or t.lower() == h.lower():
                continue
            cands.append((s, p))
    head_count = Counter(entity_name(s).lower() for s, _ in cands)
    cands = [(s, p) for s, p in cands if head_count[entity_name(s).lower()] == 1]
    if min_tail_heads > 1:
        tail_count = Counter(entity_name(p).lower() for _, p in cands)
        cands = [(s, p) for s, p in cands if tail_count[entity_name(p).lower()] >= min_tail_heads]
    cands.sort(key=lambda e: (e[0].name(), e[1].name()))
    if len(cands) < n:
        raise WordNetError(f"only {len(cands)} control IsA candidates; asked for {n}")
    rng = random.Random(f"control:{seed}")
    return [make_isa_triplet(s, p) for s, p in rng.sample(cands, n)]
