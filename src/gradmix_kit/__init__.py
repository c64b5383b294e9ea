"""gradmix_kit: the experiment kit around the gradmix library.

Corpus builders from registry packages, the small GPT and its tokenizer, the ``gradmix run`` / ``compare`` runner,
reports and statistics over run folders, clustering of a generic corpus into domains, and the ``gradmix`` command.
It uses the library (``import gradmix``) the way any user would; the library never imports it.
"""

__all__: list[str] = []
