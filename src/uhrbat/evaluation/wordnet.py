"""Offline WordNet 3.0 for the LRS-VQA synonym rule — never downloads anything.

The official scorer (LRS-VQA `Script/evaluation_LRSVQA.py`, `are_synonyms`) uses NLTK's
WordNet: two answers are synonyms if any synset pair has `path_similarity > 0.8`. Path
similarity is 1 / (shortest path + 1), so it exceeds 0.8 only at distance 0, i.e. for the
*same* synset; the rule is exactly "the two strings share a synset" under NLTK's
`synsets()` lookup (which lemmatises with morphy: "cars" ~ "car", and knows "2" ~ "two").
We compute that intersection directly (a test cross-checks it against path_similarity).

Where the WordNet 3.0 database comes from, first hit wins:

1. `$UHRBAT_WORDNET_DIR`: a directory with the WordNet 3.0 dict files (`index.noun`, `data.noun`, ...);
2. NLTK's own `wordnet` corpus if it is already installed in an NLTK data path;
3. Debian's `wordnet-base` package (`/usr/share/wordnet`; `apt-get install wordnet-base`), which
   is the same Princeton WordNet 3.0 as NLTK's corpus but lacks the `lexnames` file (we
   supply its fixed 45-line content in memory).

Both routes need the `nltk` package (pure Python, from PyPI). If no database is found the
synonym rule is disabled and the report says so (exact match only, a lower bound).
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Any

__all__ = ["WordNet", "get_wordnet", "are_synonyms", "DEBIAN_WORDNET_DIR"]

DEBIAN_WORDNET_DIR = "/usr/share/wordnet"

# WordNet 3.0 `lexnames` (lexicographer file numbers; see lexnames(5WN)).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUM = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_REQUIRED = ("index.noun", "data.noun", "index.verb", "data.verb", "index.adj", "data.adj", "index.adv", "data.adv")


class WordNet:
    """A loaded WordNet with the one query the LRS-VQA rule needs."""

    def __init__(self, reader: Any, source: str) -> None:
        self._reader = reader
        self.source = source
        self._lock = threading.Lock()
        self._cache: dict[str, frozenset[str]] = {}

    def synsets(self, word: str) -> frozenset[str]:
        """Names of the synsets NLTK's `synsets(word)` finds (morphy lemmatisation included)."""
        hit = self._cache.get(word)
        if hit is None:
            with self._lock:
                hit = frozenset(s.name() for s in self._reader.synsets(word))
            if len(self._cache) < 200_000:
                self._cache[word] = hit
        return hit

    def are_synonyms(self, a: str, b: str) -> bool:
        return bool(self.synsets(a) & self.synsets(b))

    def path_similarity_rule(self, a: str, b: str) -> bool:
        """The official loop, verbatim in behaviour (slow); used to validate `are_synonyms`."""
        s1, s2 = self._reader.synsets(a), self._reader.synsets(b)
        for x in s1:
            for y in s2:
                sim = x.path_similarity(y)
                if sim is not None and sim > 0.8:
                    return True
        return False


def _reader_for_dir(root: Path):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # NLTK >= 3.9 only opens files below its data paths.
    if str(root) not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(str(root))
    has_lexnames = (root / "lexnames").is_file()

    class _Reader(WordNetCorpusReader):
        def open(self, file):  # noqa: A003 - NLTK API
            if file == "lexnames" and not has_lexnames:
                return io.StringIO(
                    "".join(f"{i:02d}\t{n}\t{_POS_NUM[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES))
                )
            return super().open(file)

        def map_wn(self, version="wordnet"):
            # Only used for multilingual (OMW) mapping, which we do not need; the base
            # implementation would look for NLTK's own corpus to map from.
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _Reader(str(root), None)


def _is_wordnet_dir(p: Path) -> bool:
    return p.is_dir() and all((p / f).is_file() for f in _REQUIRED)


def _load() -> WordNet | None:
    try:
        import nltk  # noqa: F401
    except ImportError:
        return None
    env = os.environ.get("UHRBAT_WORDNET_DIR")
    if env:
        p = Path(env).expanduser()
        if not _is_wordnet_dir(p):
            from uhrbat.errors import ConfigError

            raise ConfigError(
                f"UHRBAT_WORDNET_DIR={env} does not hold the WordNet dict files ({', '.join(_REQUIRED[:2])}, ...)"
            )
        return WordNet(_reader_for_dir(p.resolve()), f"WordNet dict files at {p}")
    try:
        import nltk

        found = nltk.data.find("corpora/wordnet")  # raises LookupError when absent; never downloads
        from nltk.corpus import wordnet as wn

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wn.ensure_loaded()
        return WordNet(wn, f"NLTK wordnet corpus at {found}")
    except LookupError:
        pass
    except Exception:  # a broken NLTK install: fall through to the Debian files
        pass
    deb = Path(DEBIAN_WORDNET_DIR)
    if _is_wordnet_dir(deb):
        return WordNet(_reader_for_dir(deb), f"Debian wordnet-base ({deb}), WordNet 3.0")
    return None


_CACHE: dict[str, WordNet | None] = {}
_CACHE_LOCK = threading.Lock()


def get_wordnet() -> WordNet | None:
    """The process-wide WordNet (loaded once, ~1 s), or None when no database is installed."""
    key = os.environ.get("UHRBAT_WORDNET_DIR", "")
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load()
        return _CACHE[key]


def are_synonyms(a: str, b: str) -> bool:
    wn = get_wordnet()
    return wn.are_synonyms(a, b) if wn is not None else False
